"""ControlNet: steering a generation with a control map (edges, scribbles, poses, tiles).

darkroom/control_unit.py (beside request.py, part of the request contract) describes one unit
with the A1111 extension's fields; files.py finds ControlNet files and names them, load.py loads
them (keys.py maps the original layout's names, config.py reads what a file is from its shapes;
control_lora.py builds a Control-LoRA on the checkpoint's UNet; adapter.py loads and runs T2I-Adapters);
preprocess.py turns a user's picture into a control map; prepare.py readies a request's units once
and apply.py feeds their residuals to the UNet during sampling.
"""
