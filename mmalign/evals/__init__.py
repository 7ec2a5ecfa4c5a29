"""Evaluation as a library: image, video and vision-language evaluators, judges, results files and the HTML
report; the `mmalign eval` verbs (cli_*.py) only translate arguments into their settings."""
