"""Vision-language pairs / conversations: every format, every source kind, image kinds, bad rows, round trips."""
import io
import json

import pytest
from PIL import Image

from mmalign.datasets.records import DataError
from mmalign.datasets.vl_records import (
    VLConversation, VLPair, detect_format, load_images, read_vl_conversations, read_vl_pairs,
    write_vl_conversations_jsonl, write_vl_pairs_jsonl)

IMG = {"type": "image"}
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def T(s):
    return {"type": "text", "text": s}


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def bot(s):
    return [{"role": "assistant", "content": [T(s)]}]


def png(rgb):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buf, "PNG")
    return buf.getvalue()


def truncated_jpeg():
    """A JPEG cut short: PIL's open + verify accept it, only a full decode fails."""
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, "JPEG")
    return buf.getvalue()[:1500]


def save(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), rgb).save(path)
    return path


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def colors(rec):
    return [im.getpixel((4, 4)) for im in load_images(rec)]


# ---- formats from jsonl ----

def test_trl_conversational_strings_and_markers(tmp_path):
    for name, rgb in (("a", RED), ("b", GREEN), ("c", BLUE)):
        save(tmp_path / "img" / f"{name}.png", rgb)
    f = write_jsonl(tmp_path / "pairs.jsonl", [
        {"images": ["img/a.png", "img/b.png"], "prompt": user(T("Compare"), IMG, IMG), "chosen": bot("same"),
         "rejected": bot("different"), "id": 7},
        {"image": "img/c.png", "prompt": "Colour?", "chosen": "blue", "rejected": "red"},
        {"images": ["img/a.png", "img/c.png"], "prompt": "Is <image>\nlike <image> ?", "chosen": "no",
         "rejected": "yes"},
    ])
    pairs, report = read_vl_pairs(f)
    assert report.total == 3 and report.kept == 3 and not report.skipped
    a, b, c = pairs
    assert a.prompt == user(T("Compare"), IMG, IMG) and a.chosen == bot("same") and a.rejected == bot("different")
    assert a.images == (tmp_path / "img/a.png", tmp_path / "img/b.png") and a.meta == {"id": 7}
    assert a.where == f"{f}:1" and colors(a) == [RED, GREEN]
    assert b.prompt == user(IMG, T("Colour?")) and b.chosen == bot("blue") and colors(b) == [BLUE]
    assert c.prompt == user(T("Is"), IMG, T("like"), IMG, T("?")) and colors(c) == [RED, BLUE]
    assert isinstance(a, VLPair) and read_vl_pairs(tmp_path)[0] == pairs  # the folder finds pairs.jsonl


def test_rlaif_v_bytes_and_meta(tmp_path):
    f = write_jsonl(tmp_path / "r.jsonl", [
        {"image": {"bytes": None, "path": "x.png"}, "question": "What colour?", "chosen": "green",
         "rejected": "red", "ds_name": "VQAv2", "origin_dataset": "coco", "image_path": "orig/1.jpg", "idx": 3}])
    save(tmp_path / "x.png", GREEN)
    (p,), report = read_vl_pairs(f)
    assert report.kept == 1
    assert p.prompt == user(IMG, T("What colour?")) and p.chosen == bot("green") and p.rejected == bot("red")
    assert p.meta == {"ds_name": "VQAv2", "origin_dataset": "coco", "image_path": "orig/1.jpg", "idx": 3}
    assert colors(p) == [GREEN]


def test_mm_rlhf_image_list_and_reasons(tmp_path):
    save(tmp_path / "i/a.png", RED)
    save(tmp_path / "i/b.png", BLUE)
    f = write_jsonl(tmp_path / "m.jsonl", [
        {"image": ["i/a.png", "i/b.png"], "prompt": "Describe both.", "chosen": "red, blue", "rejected": "two cats",
         "chosen_reason": "accurate", "rejected_reason": "hallucinated"},
        {"image": "i/b.png", "prompt": "Describe.", "chosen": "blue", "rejected": "cat",
         "chosen_reason": "ok", "rejected_reason": "no"}])
    pairs, report = read_vl_pairs(f)
    assert report.kept == 2
    assert pairs[0].prompt == user(IMG, IMG, T("Describe both.")) and colors(pairs[0]) == [RED, BLUE]
    assert pairs[0].meta == {"chosen_reason": "accurate", "rejected_reason": "hallucinated"}
    assert pairs[1].images == (tmp_path / "i/b.png",) and pairs[1].rejected == bot("cat")
    assert read_vl_pairs(f, format="trl")[0][1].meta == {"chosen_reason": "ok", "rejected_reason": "no"}


def completion(model, text, *ratings):
    names = ("Helpfulness", "Visual Faithfulness", "Ethical Considerations")
    return {"model": model, "response": text,
            "annotations": {n: {"Rating": r, "Rationale": "."} for n, r in zip(names, ratings)}}


def vlfeedback_file(tmp_path):
    save(tmp_path / "v.png", RED)
    return write_jsonl(tmp_path / "vlf.jsonl", [
        {"id": "q1", "prompt": "What is shown?", "img_path": "v.png", "completions": [
            completion("m1", "a red square", "4", "5", "5"),       # 14/3
            completion("m2", "a dog", "2", "3", "5"),              # 10/3
            completion("m3", "red", "3", "N/A", "5"),              # skipped: N/A
            completion("m4", "a cat", "3", "2", "5")]},            # 10/3, ties m2
        {"id": "q2", "prompt": "Colour?", "img_path": "v.png", "completions": [
            completion("m1", "red", 4, 4, 4), completion("m2", "blue", "4", "4", "4")]},   # tie
        {"id": "q3", "prompt": "Shape?", "img_path": "v.png", "completions": [
            completion("m1", "square", "4", "4", "4"), completion("m2", "a square", "4", "4", "3")]}])  # gap 1/3


def test_vlfeedback_best_vs_worst_ties_gap_and_na(tmp_path):
    f = vlfeedback_file(tmp_path)
    pairs, report = read_vl_pairs(f, min_rating_gap=0.5)
    assert report.total == 3 and report.kept == 1
    assert report.skipped == {"completion: non-numeric rating": 1, "tie (equal ratings)": 1,
                              "rating gap below min_rating_gap": 1}
    assert report.examples["completion: non-numeric rating"] == [f"{f}:1 completions[2]"]
    assert report.examples["tie (equal ratings)"] == [f"{f}:2"]
    (p,) = pairs
    assert p.prompt == user(IMG, T("What is shown?")) and p.chosen == bot("a red square")
    assert p.rejected == bot("a dog")  # m2 and m4 tie for worst: the first in source order
    assert p.meta == {"id": "q1", "img_path": "v.png", "chosen_model": "m1", "rejected_model": "m2",
                      "chosen_score": pytest.approx(14 / 3), "rejected_score": pytest.approx(10 / 3)}
    assert colors(p) == [RED]
    pairs, report = read_vl_pairs(f)  # no gap filter: q3 is kept
    assert [q.chosen[0]["content"][0]["text"] for q in pairs] == ["a red square", "square"]
    with pytest.raises(DataError, match=r"vlf.jsonl:2: tie"):
        read_vl_pairs(f, ties="error")
    with pytest.raises(DataError, match=r"vlf.jsonl:1 completions\[2\]: completion: non-numeric rating"):
        read_vl_pairs(f, bad_rows="error")


def test_vlfeedback_all_pairs(tmp_path):
    pairs, report = read_vl_pairs(vlfeedback_file(tmp_path), pairing="all")
    got = [(p.meta["chosen_model"], p.meta["rejected_model"]) for p in pairs]
    assert got == [("m1", "m2"), ("m1", "m4"), ("m1", "m2")]  # q1: 2 pairs (m2 vs m4 tie), q2: a tie, q3: 1
    assert report.kept == 3 and report.skipped == {"tie (equal ratings)": 2, "completion: non-numeric rating": 1}
    assert report.examples["tie (equal ratings)"][0] == f"{tmp_path / 'vlf.jsonl'}:1 completions[1] vs [3]"
    assert pairs[2].chosen == bot("square") and pairs[1].rejected == bot("a cat")
    with pytest.raises(ValueError, match="vlfeedback"):
        read_vl_pairs(tmp_path / "vlf.jsonl", format="trl", min_rating_gap=1.0)


# ---- bad rows ----

GOOD = {"image": "ok.png", "prompt": "Q?", "chosen": "yes", "rejected": "no"}
BAD = [  # (row, reason)
    ("{not json", "invalid JSON (Expecting property name enclosed in double quotes)"),
    ({"image": "ok.png", "prompt": "Q?", "chosen": "yes"}, "missing rejected"),
    ({**GOOD, "chosen": "  "}, "empty chosen"),
    ({**GOOD, "rejected": bot("")}, "empty rejected"),
    ({**GOOD, "rejected": "yes"}, "chosen == rejected"),
    ({**GOOD, "prompt": 5}, "non-string text in prompt"),
    ({**GOOD, "prompt": user({"type": "text", "text": 3})}, "non-string text in prompt"),
    ({**GOOD, "prompt": "<image> vs <image>?"}, "image placeholder count != image count in prompt"),
    ({**GOOD, "chosen": "see <image>"}, "image placeholder in chosen"),
    ({**GOOD, "image": "gone.png"}, "image file not found"),
    ({**GOOD, "image": "garbage.png"}, "unreadable image"),
    ({**GOOD, "image": "truncated.jpg"}, "unreadable image"),
    ({**GOOD, "image": None}, "no image (text-only rows need allow_text_only=True)"),
    ({**GOOD, "images": ["ok.png", None]}, "missing image"),
    ({**GOOD, "prompt": bot("Q?")}, "prompt does not end with a user turn"),
]


def bad_folder(tmp_path):
    save(tmp_path / "ok.png", RED)
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    (tmp_path / "truncated.jpg").write_bytes(truncated_jpeg())
    return tmp_path


def test_every_bad_row_kind_is_counted_with_its_location(tmp_path):
    lines = [GOOD] + [row for row, _ in BAD] + [{**GOOD, "chosen": "sure"}]
    f = write_jsonl(bad_folder(tmp_path) / "pairs.jsonl", lines)
    pairs, report = read_vl_pairs(f)
    assert report.total == len(BAD) + 2 and report.kept == 2 and sum(report.skipped.values()) == len(BAD)
    assert [p.chosen for p in pairs] == [bot("yes"), bot("sure")]
    expected = {}
    for line, (_, reason) in enumerate(BAD, 2):
        expected[reason] = expected.get(reason, 0) + 1
        assert any(w.startswith(f"{f}:{line}") for w in report.examples[reason]), reason
    assert dict(report.skipped) == expected
    assert report.examples["image file not found"] == [f"{f}:11 image[0] ({tmp_path / 'gone.png'})"]
    assert report.examples["missing image"] == [f"{f}:15 images[1]"]
    assert "image file is truncated" in report.examples["unreadable image"][1]
    assert read_vl_pairs(f, check_images="verify")[1].skipped["unreadable image"] == 1  # the weaker check
    text_only, rep = read_vl_pairs(f, allow_text_only=True)
    assert rep.kept == 3 and text_only[1].images == () and text_only[1].prompt == user(T("Q?"))
    g = write_jsonl(tmp_path / "empty.jsonl", [{**GOOD, "image": None, "prompt": " "}, {**GOOD, "prompt": ""}])
    pairs, rep = read_vl_pairs(g, allow_text_only=True)  # an image alone is a prompt; nothing at all is not
    assert rep.skipped == {"empty prompt": 1} and rep.examples["empty prompt"] == [f"{g}:1"]
    assert [p.prompt for p in pairs] == [user(IMG)]


@pytest.mark.parametrize("row,reason", BAD, ids=[r for _, r in BAD])
def test_every_bad_row_kind_raises_under_error(tmp_path, row, reason):
    f = write_jsonl(bad_folder(tmp_path) / "pairs.jsonl", [GOOD, row])
    with pytest.raises(DataError) as e:
        read_vl_pairs(f, format="trl", bad_rows="error")
    assert str(e.value).startswith(f"{f}:2") and reason in str(e.value)


# ---- sources and image kinds ----

def trl_dataset():
    import datasets
    return datasets.Dataset.from_dict({
        "images": [[Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), GREEN)],
                   [Image.new("RGB", (8, 8), BLUE)]],
        "prompt": [user(T("Two?"), IMG, IMG), user(IMG, T("One?"))],
        "chosen": [bot("two"), bot("one")], "rejected": [bot("three"), bot("none")], "n": [0, 1]})


def rlaif_dataset():
    import datasets
    return datasets.Dataset.from_dict({
        "image": [Image.new("RGB", (8, 8), c) for c in (RED, BLUE)], "question": ["c1?", "c2?"],
        "chosen": ["red", "blue"], "rejected": ["x", "y"], "ds_name": ["a", "b"], "origin_dataset": ["o", "o"]})


def check_trl(pairs, report, where):
    assert report.kept == 2 and pairs[0].where == where
    assert pairs[0].prompt == user(T("Two?"), IMG, IMG) and pairs[1].prompt == user(IMG, T("One?"))
    assert pairs[0].rejected == bot("three") and pairs[1].meta == {"n": 1}
    assert colors(pairs[0]) == [RED, GREEN] and colors(pairs[1]) == [BLUE]
    assert all(isinstance(s, bytes) for p in pairs for s in p.images)


def check_rlaif(pairs, report):
    assert report.kept == 2 and [p.prompt for p in pairs] == [user(IMG, T("c1?")), user(IMG, T("c2?"))]
    assert pairs[1].meta == {"ds_name": "b", "origin_dataset": "o"} and colors(pairs[1]) == [BLUE]


def test_dataset_object_save_to_disk_and_parquet(tmp_path):
    import pyarrow.parquet as pq
    for make, check in ((trl_dataset, check_trl), (rlaif_dataset, check_rlaif)):
        ds, d = make(), tmp_path / make.__name__
        got = [read_vl_pairs(ds)]
        ds.save_to_disk(str(d / "disk"))
        got.append(read_vl_pairs(d / "disk"))
        ds.to_parquet(str(d / "one.parquet"))
        got.append(read_vl_pairs(d / "one.parquet"))
        (d / "shards").mkdir()
        for k in range(2):
            pq.write_table(pq.read_table(d / "one.parquet").slice(k, 1), d / "shards" / f"s{k}.parquet")
        got.append(read_vl_pairs(d / "shards"))
        wheres = ["dataset[0]", f"{d / 'disk'}[0]", f"{d / 'one.parquet'}[0]", f"{d / 'shards' / 's0.parquet'}[0]"]
        for (pairs, report), where in zip(got, wheres):
            if make is trl_dataset:
                check(pairs, report, where)
            else:
                check(pairs, report)
                assert pairs[0].where == where


def test_raw_bytes_relative_paths_and_image_root(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"image": [png(GREEN), b""], "question": ["q", "q"], "chosen": ["a", "a"],
                             "rejected": ["b", "b"]}), tmp_path / "raw.parquet")
    pairs, report = read_vl_pairs(tmp_path / "raw.parquet")
    assert colors(pairs[0]) == [GREEN] and report.skipped == {"missing image": 1}
    save(tmp_path / "elsewhere/p.png", BLUE)
    f = write_jsonl(tmp_path / "data/pairs.jsonl", [{**GOOD, "image": "p.png"},
                                                    {**GOOD, "image": {"bytes": None, "path": "p.png"}}])
    pairs, report = read_vl_pairs(f, image_root=tmp_path / "elsewhere")
    assert report.kept == 2 and [colors(p) for p in pairs] == [[BLUE], [BLUE]]
    assert read_vl_pairs(f)[1].skipped == {"image file not found": 2}  # relative to data/ by default
    absolute = write_jsonl(tmp_path / "abs.jsonl", [{**GOOD, "image": str(tmp_path / "elsewhere/p.png")}])
    assert colors(read_vl_pairs(absolute)[0][0]) == [BLUE]


def test_auto_detection_and_its_errors(tmp_path):
    assert detect_format(["images", "prompt", "chosen", "rejected"]) == "trl"
    assert detect_format(["image", "prompt", "chosen", "rejected"]) == "trl"
    assert detect_format(["image", "question", "chosen", "rejected", "ds_name"]) == "rlaif_v"
    assert detect_format(["img_path", "prompt", "completions", "id"]) == "vlfeedback"
    assert detect_format(["image", "prompt", "chosen", "rejected", "chosen_reason"]) == "mm_rlhf"
    with pytest.raises(DataError, match=r"ambiguous: fits trl, rlaif_v .*'question'"):
        detect_format(["image", "prompt", "question", "chosen", "rejected"])
    f = write_jsonl(tmp_path / "x.jsonl", ["{bad", {"image": "a.png", "text": "t"}])
    with pytest.raises(DataError, match=r"unknown format \(columns found: \['image', 'text'\]\).*rlaif_v: question"):
        read_vl_pairs(f)
    f = write_jsonl(tmp_path / "y.jsonl", ["{bad", {**GOOD, "image": "ok.png"}])
    save(tmp_path / "ok.png", RED)
    pairs, report = read_vl_pairs(f)  # the unparsable first line is still counted
    assert report.total == 2 and report.kept == 1 and report.examples["invalid JSON (Expecting property name "
                                                                      "enclosed in double quotes)"] == [f"{f}:1"]


def test_hub_id_load_and_clear_offline_error(monkeypatch):
    import datasets
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: rlaif_dataset())
    pairs, report = read_vl_pairs("openbmb/RLAIF-V-Dataset")
    check_rlaif(pairs, report)
    assert pairs[0].where == "openbmb/RLAIF-V-Dataset[0]"

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the Hub")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"'owner/name' with datasets.load_dataset \(ConnectionError.*offline"):
        read_vl_pairs("owner/name")
    with pytest.raises(FileNotFoundError):
        read_vl_pairs("data/missing.jsonl")


# ---- conversations ----

def test_conversations_formats_and_bad_rows(tmp_path):
    save(tmp_path / "c.png", GREEN)
    msgs = user(T("Hi"), IMG) + bot("green") + user(T("Sure?")) + bot("yes")
    f = write_jsonl(tmp_path / "conversations.jsonl", [
        {"images": ["c.png"], "messages": msgs, "src": "a"},
        {"image": "c.png", "prompt": "What colour?", "completion": "green"},
        {"images": ["c.png"], "prompt": user(T("<image> Colour?")), "completion": bot("green")},
        {"images": ["c.png"], "messages": user(IMG, T("Hi"))},                          # ends with the user
        {"images": ["c.png"], "messages": user(IMG, IMG, T("Hi")) + bot("x")},          # 2 placeholders
        {"images": ["c.png"], "messages": user(T("Hi")) + [{"role": "assistant", "content": [IMG]}]},
        {"images": ["c.png"], "messages": user(T("Hi")) + bot("a <image> b")},         # image in a reply
        {"images": ["c.png"], "text": "hi"},
        {"images": ["gone.png"], "messages": msgs},
    ])
    convs, report = read_vl_conversations(f)
    assert report.total == 9 and report.kept == 3 and all(isinstance(c, VLConversation) for c in convs)
    assert convs[0].messages == msgs and convs[0].meta == {"src": "a"} and colors(convs[0]) == [GREEN]
    assert convs[1].messages == user(IMG, T("What colour?")) + bot("green")
    assert convs[2].messages == user(IMG, T("Colour?")) + bot("green")
    assert report.skipped == {"last message is not from the assistant": 1, "empty assistant reply": 1,
                              "image placeholder count != image count in messages": 1,
                              "image placeholder in an assistant turn": 1,
                              "missing messages (or prompt and completion)": 1, "image file not found": 1}
    assert report.examples["empty assistant reply"] == [f"{f}:6"]
    with pytest.raises(DataError, match=r"conversations.jsonl:4: last message is not from the assistant"):
        read_vl_conversations(f, bad_rows="error")


# ---- round trips ----

def test_write_read_round_trip_pairs(tmp_path):
    ims = [Image.new("RGB", (8, 8), c) for c in (RED, GREEN, BLUE)]
    path = write_vl_pairs_jsonl(tmp_path / "out", [
        (ims[:2], "Left <image> right <image> same?", "no", "yes", {"k": 1}),
        (ims[2:], "Colour?", "blue", "red", {})])
    assert path == tmp_path / "out" / "pairs.jsonl"
    assert json.loads(path.read_text().splitlines()[0])["images"] == ["images/000000_0.png", "images/000000_1.png"]
    for source in (path, tmp_path / "out"):
        pairs, report = read_vl_pairs(source)
        assert report.kept == 2 and not report.skipped
        assert pairs[0].prompt == user(T("Left"), IMG, T("right"), IMG, T("same?")) and pairs[0].meta == {"k": 1}
        assert pairs[1].prompt == user(IMG, T("Colour?")) and pairs[1].chosen == bot("blue")
        assert [colors(p) for p in pairs] == [[RED, GREEN], [BLUE]]
    with pytest.raises(ValueError, match="clash"):
        write_vl_pairs_jsonl(tmp_path / "bad", [(ims[:1], "q", "a", "b", {"chosen": 1})])
    with pytest.raises(ValueError, match="row 0: image placeholder count"):
        write_vl_pairs_jsonl(tmp_path / "bad", [(ims[:1], "<image> <image>", "a", "b", {})])


def test_write_read_round_trip_conversations(tmp_path):
    ims = [Image.new("RGB", (8, 8), c) for c in (RED, BLUE)]
    path = write_vl_conversations_jsonl(tmp_path / "out", [
        (ims, user(T("Two?")) + bot("yes"), {"id": 1}),
        ([], [{"role": "user", "content": "text only"}, {"role": "assistant", "content": "ok"}], {})])
    convs, report = read_vl_conversations(path, allow_text_only=True)
    assert report.kept == 2
    assert convs[0].messages == user(IMG, IMG, T("Two?")) + bot("yes") and convs[0].meta == {"id": 1}
    assert colors(convs[0]) == [RED, BLUE] and convs[1].images == ()
    assert convs[1].messages == user(T("text only")) + bot("ok")
    assert read_vl_conversations(tmp_path / "out")[1].skipped == {
        "no image (text-only rows need allow_text_only=True)": 1}
