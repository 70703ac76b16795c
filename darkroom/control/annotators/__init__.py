"""The preprocessors' image work (no torch) and, in their own modules, the small nets that need weight files.

darkroom/control/preprocess.py is the entry point; these modules work on uint8 HxWx3 arrays, as the
sd-webui-controlnet extension's annotators do, so thresholds mean the same numbers as there.
"""
