"""Preference alignment of LLaVA-style vision-language models (any AutoModelForImageTextToText + AutoProcessor)."""
