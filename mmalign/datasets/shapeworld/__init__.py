"""ShapeWorld: the embedded synthetic world with exact ground truth (see scene.py for the grammar)."""
from .render import degrade, render_scene, render_shapes
from .scene import (CAPTION_KINDS, COLOURS, RELATIONS, SHAPES, SIZES, SPLITS, Requirement, Scene, Shape,
                    heldout_part, in_split, is_heldout, parse_caption, sample_scene, sample_scenes, vocabulary)
from .scorer import Detected, extract_objects, score_image
