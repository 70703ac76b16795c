"""ControlNet: steering a generation with a control map (edges, scribbles, poses, tiles).

darkroom/control_unit.py (beside request.py, part of the request contract) describes one unit
with the A1111 extension's fields; files.py finds and loads ControlNet files; apply.py feeds their
residuals to the UNet during sampling; preprocess.py turns a user's picture into a control map.
"""
