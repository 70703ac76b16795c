"""Face restoration (GFPGAN, CodeFormer) from the files users already have: RetinaFace detection
(detect.py), FFHQ alignment and feathered paste-back (align.py), finding and building the models
(load.py) and the restorer the engine, the extras routes and the CLI use (restore.py)."""

from darkroom.faces.load import CODEFORMER, DETECTOR_FILE, GFPGAN, MODELS, WEBUI_FILES
from darkroom.faces.restore import FaceRestorer

__all__ = ["FaceRestorer", "CODEFORMER", "GFPGAN", "MODELS", "DETECTOR_FILE", "WEBUI_FILES"]
