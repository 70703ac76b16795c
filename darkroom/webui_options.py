"""The AUTOMATIC1111 webui's options (`GET/POST /sdapi/v1/options`, `override_settings`): names, defaults, kinds.

Clients written for the webui read its ~250 options and write some back (send_seed, samples_format,
...), so Darkroom answers with the whole table. Each key falls in one of three classes:

- applied: Darkroom has a setting for it (darkroom/settings.py rows with an `a1111` name, e.g.
  sd_model_checkpoint, CLIP_stop_at_last_layers, sd_vae, samples_format, jpeg_quality);
- `PICTURE`: it changes the picture in the webui, Darkroom does not apply it: the values Darkroom's
  pictures match are accepted (the first is what `GET /options` reports), any other is refused,
  naming the key, since an image that silently differs from what was asked is worse than an error;
- everything else (UI, saving paths, console, training, ...): it cannot change a picture, so it is
  stored as given (type-checked against its default) and read back, and otherwise ignored.

Origin of the data (defaults only, no code): AUTOMATIC1111/stable-diffusion-webui
modules/shared_options.py at commit 488d6943b9de1629a29b393be9819dd346168964 (the v1.7 layout), plus
the picture-changing options added by v1.8-v1.10 (emphasis, sd_noise_schedule, sdxl_clip_l_skip,
skip_early_cond, s_min_uncond_all, use_downcasted_alpha_bar, beta_dist_alpha/beta,
enable_prompt_comments) and a few non-picture ones of those versions. OptionHTML entries, which
the webui never saves or reports, are left out; `enable_console_prompts` (a command-line default) is False.
"""

from __future__ import annotations

import math
from typing import Any

_SAVING = {
    "samples_save": True, "samples_format": "png", "samples_filename_pattern": "", "save_images_add_number": True,
    "save_images_replace_action": "Replace", "grid_save": True, "grid_format": "png", "grid_extended_filename": False,
    "grid_only_if_multiple": True, "grid_prevent_empty_spots": False, "grid_zip_filename_pattern": "", "n_rows": -1,
    "font": "", "grid_text_active_color": "#000000", "grid_text_inactive_color": "#999999",
    "grid_background_color": "#ffffff", "save_images_before_face_restoration": False,
    "save_images_before_highres_fix": False, "save_images_before_color_correction": False, "save_mask": False,
    "save_mask_composite": False, "jpeg_quality": 80, "webp_lossless": False, "export_for_4chan": True,
    "img_downscale_threshold": 4.0, "target_side_length": 4000, "img_max_size_mp": 200,
    "use_original_name_batch": True, "use_upscaler_name_as_suffix": False, "save_selected_only": True,
    "save_init_img": False, "temp_dir": "", "clean_temp_dir_at_start": False, "save_incomplete_images": False,
    "notification_audio": True, "notification_volume": 100, "save_write_log_csv": True,
    "outdir_samples": "", "outdir_txt2img_samples": "outputs/txt2img-images",
    "outdir_img2img_samples": "outputs/img2img-images", "outdir_extras_samples": "outputs/extras-images",
    "outdir_grids": "", "outdir_txt2img_grids": "outputs/txt2img-grids",
    "outdir_img2img_grids": "outputs/img2img-grids",
    "outdir_save": "log/images", "outdir_init_images": "outputs/init-images", "save_to_dirs": True,
    "grid_save_to_dirs": True, "use_save_to_dirs_for_ui": False, "directories_filename_pattern": "[date]",
    "directories_max_prompt_words": 8,
}
_UPSCALING_SYSTEM_TRAINING = {
    "ESRGAN_tile": 192, "ESRGAN_tile_overlap": 8, "realesrgan_enabled_models": ["R-ESRGAN 4x+", "R-ESRGAN 4x+ Anime6B"],
    "upscaler_for_img2img": None, "face_restoration": False, "face_restoration_model": "CodeFormer",
    "code_former_weight": 0.5, "face_restoration_unload": False, "auto_launch_browser": "Local",
    "enable_console_prompts": False, "show_warnings": False, "show_gradio_deprecation_warnings": True,
    "memmon_poll_rate": 8, "samples_log_stdout": False, "multiple_tqdm": True, "print_hypernet_extra": False,
    "list_hidden_files": True, "disable_mmap_load_safetensors": False, "hide_ldm_prints": True,
    "dump_stacks_on_signal": False, "prevent_screen_sleep_during_generation": True, "api_enable_requests": True,
    "api_forbid_local_requests": True, "api_useragent": "", "unload_models_when_training": False,
    "pin_memory": False, "save_optimizer_state": False, "save_training_settings_to_txt": True,
    "dataset_filename_word_regex": "", "dataset_filename_join_string": " ", "training_image_repeats_per_epoch": 1,
    "training_write_csv_every": 500, "training_xattention_optimizations": False, "training_enable_tensorboard": False,
    "training_tensorboard_save_images": False, "training_tensorboard_flush_every": 120,
}
_STABLE_DIFFUSION = {
    "sd_model_checkpoint": None, "sd_checkpoints_limit": 1, "sd_checkpoints_keep_in_cpu": True,
    "sd_checkpoint_cache": 0,
    "sd_unet": "Automatic", "enable_quantization": False, "enable_emphasis": True, "emphasis": "Original",
    "enable_batch_seeds": True, "comma_padding_backtrack": 20, "sdxl_clip_l_skip": False,
    "CLIP_stop_at_last_layers": 1, "upcast_attn": False, "randn_source": "GPU", "tiling": False,
    "hires_fix_refiner_pass": "second pass", "enable_prompt_comments": True, "sd_noise_schedule": "Default",
    "skip_early_cond": 0.0, "sdxl_crop_top": 0, "sdxl_crop_left": 0, "sdxl_refiner_low_aesthetic_score": 2.5,
    "sdxl_refiner_high_aesthetic_score": 6.0, "sd_vae_checkpoint_cache": 0, "sd_vae": "Automatic",
    "sd_vae_overrides_per_model_preferences": True, "auto_vae_precision": True, "sd_vae_encode_method": "Full",
    "sd_vae_decode_method": "Full", "inpainting_mask_weight": 1.0, "initial_noise_multiplier": 1.0,
    "img2img_extra_noise": 0.0, "img2img_color_correction": False, "img2img_fix_steps": False,
    "img2img_background_color": "#ffffff", "img2img_editor_height": 720,
    "img2img_sketch_default_brush_color": "#ffffff",
    "img2img_inpaint_mask_brush_color": "#ffffff", "img2img_inpaint_sketch_default_brush_color": "#ffffff",
    "return_mask": False, "return_mask_composite": False, "img2img_batch_show_results_limit": 32,
    "cross_attention_optimization": "Automatic", "s_min_uncond": 0.0, "s_min_uncond_all": False,
    "token_merging_ratio": 0.0, "token_merging_ratio_img2img": 0.0, "token_merging_ratio_hr": 0.0,
    "pad_cond_uncond": False, "persistent_cond_cache": True, "batch_cond_uncond": True,
    "use_old_emphasis_implementation": False, "use_old_karras_scheduler_sigmas": False,
    "no_dpmpp_sde_batch_determinism": False, "use_old_hires_fix_width_height": False,
    "dont_fix_second_order_samplers_schedule": False, "hires_fix_use_firstpass_conds": False,
    "use_old_scheduling": False, "use_downcasted_alpha_bar": False, "refiner_switch_by_sample_steps": False,
    "auto_backcompat": True,
}
_INTERROGATE_NETWORKS = {
    "interrogate_keep_models_in_memory": False, "interrogate_return_ranks": False, "interrogate_clip_num_beams": 1,
    "interrogate_clip_min_length": 24, "interrogate_clip_max_length": 48, "interrogate_clip_dict_limit": 1500,
    "interrogate_clip_skip_categories": [], "interrogate_deepbooru_score_threshold": 0.5, "deepbooru_sort_alpha": True,
    "deepbooru_use_spaces": True, "deepbooru_escape": True, "deepbooru_filter_tags": "",
    "extra_networks_show_hidden_directories": True, "extra_networks_dir_button_function": False,
    "extra_networks_hidden_models": "When searched", "extra_networks_default_multiplier": 1.0,
    "extra_networks_card_width": 0, "extra_networks_card_height": 0, "extra_networks_card_text_scale": 1.0,
    "extra_networks_card_show_desc": True, "extra_networks_card_order_field": "Path",
    "extra_networks_card_order": "Ascending", "extra_networks_add_text_separator": " ",
    "ui_extra_networks_tab_reorder": "", "textual_inversion_print_at_load": False,
    "textual_inversion_add_hashes_to_infotext": True, "sd_hypernetwork": "None",
}
_UI = {
    "keyedit_precision_attention": 0.1, "keyedit_precision_extra": 0.05, "keyedit_delimiters": ".,\\/!?%^*;:{}=`~() ",
    "keyedit_delimiters_whitespace": ["Tab", "Carriage Return", "Line Feed"], "keyedit_move": True,
    "disable_token_counters": False, "return_grid": True, "do_not_show_images": False, "js_modal_lightbox": True,
    "js_modal_lightbox_initially_zoomed": True, "js_modal_lightbox_gamepad": False,
    "js_modal_lightbox_gamepad_repeat": 250, "gallery_height": "", "compact_prompt_box": False,
    "samplers_in_dropdown": True, "dimensions_and_batch_together": True, "sd_checkpoint_dropdown_use_short": False,
    "hires_fix_show_sampler": False, "hires_fix_show_prompts": False, "txt2img_settings_accordion": False,
    "img2img_settings_accordion": False, "localization": "None", "quicksettings_list": ["sd_model_checkpoint"],
    "ui_tab_order": [], "hidden_tabs": [], "ui_reorder_list": [], "gradio_theme": "Default",
    "gradio_themes_cache": True, "show_progress_in_title": True, "send_seed": True, "send_size": True,
    "enable_pnginfo": True, "save_txt": False, "add_model_name_to_info": True, "add_model_hash_to_info": True,
    "add_vae_name_to_info": True, "add_vae_hash_to_info": True, "add_user_name_to_info": False,
    "add_version_to_infotext": True, "disable_weights_auto_swap": True, "infotext_skip_pasting": [],
    "infotext_styles": "Apply if any", "show_progressbar": True, "live_previews_enable": True,
    "live_previews_image_format": "png", "show_progress_grid": True, "show_progress_every_n_steps": 10,
    "show_progress_type": "Approx NN", "live_preview_allow_lowvram_full": False, "live_preview_content": "Prompt",
    "live_preview_refresh_period": 1000, "live_preview_fast_interrupt": False,
    "js_live_preview_in_modal_lightbox": False,
}
_SAMPLER_PARAMS = {
    "hide_samplers": [], "eta_ddim": 0.0, "eta_ancestral": 1.0, "ddim_discretize": "uniform", "s_churn": 0.0,
    "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0, "k_sched_type": "Automatic", "sigma_min": 0.0, "sigma_max": 0.0,
    "rho": 0.0, "eta_noise_seed_delta": 0, "always_discard_next_to_last_sigma": False, "sgm_noise_multiplier": False,
    "uni_pc_variant": "bh1", "uni_pc_skip_type": "time_uniform", "uni_pc_order": 3, "uni_pc_lower_order_final": True,
    "beta_dist_alpha": 0.6, "beta_dist_beta": 0.6, "postprocessing_enable_in_main_ui": [],
    "postprocessing_operation_order": [], "upscaling_max_images_in_cache": 5,
    "postprocessing_existing_caption_action": "Ignore", "disabled_extensions": [], "disable_all_extensions": "none",
    "restore_config_state_file": "", "sd_checkpoint_hash": "",
}

DEFAULTS: dict[str, Any] = {**_SAVING, **_UPSCALING_SYSTEM_TRAINING, **_STABLE_DIFFUSION, **_INTERROGATE_NETWORKS,
                            **_UI, **_SAMPLER_PARAMS}
"""Every webui option with the webui's default value (the kind of a value is its default's)."""

_FALSE_KEYS = (
    "enable_quantization", "sdxl_clip_l_skip", "tiling", "img2img_color_correction", "img2img_fix_steps",
    "s_min_uncond_all", "pad_cond_uncond", "use_old_emphasis_implementation", "use_old_karras_scheduler_sigmas",
    "no_dpmpp_sde_batch_determinism", "use_old_hires_fix_width_height", "dont_fix_second_order_samplers_schedule",
    "hires_fix_use_firstpass_conds", "use_old_scheduling", "use_downcasted_alpha_bar", "face_restoration",
    "always_discard_next_to_last_sigma", "sgm_noise_multiplier",
    "enable_prompt_comments",  # Darkroom keeps `#` lines in prompts (the webui's behaviour before v1.8)
)
_AS_DEFAULT_KEYS = (
    "enable_emphasis", "emphasis", "enable_batch_seeds", "comma_padding_backtrack", "sd_noise_schedule",
    "skip_early_cond", "sdxl_crop_top", "sdxl_crop_left", "sdxl_refiner_low_aesthetic_score",
    "sdxl_refiner_high_aesthetic_score", "sd_vae_encode_method", "sd_vae_decode_method", "inpainting_mask_weight",
    "initial_noise_multiplier", "img2img_extra_noise", "img2img_background_color", "s_min_uncond",
    "extra_networks_default_multiplier",
    "sd_hypernetwork", "eta_ddim", "eta_ancestral", "ddim_discretize", "s_churn", "s_tmin", "s_tmax", "s_noise",
    "k_sched_type", "sigma_min", "sigma_max", "rho", "uni_pc_variant", "uni_pc_skip_type", "uni_pc_order",
    "uni_pc_lower_order_final", "beta_dist_alpha", "beta_dist_beta",
)
PICTURE: dict[str, tuple[Any, ...]] = {
    **{key: (False,) for key in _FALSE_KEYS},
    **{key: (DEFAULTS[key],) for key in _AS_DEFAULT_KEYS},
    "sd_unet": ("Automatic", "None"),  # no separate UNet files: both mean the checkpoint's own
}
"""Options that change the picture and that Darkroom does not apply: the values its pictures match
(the first is what Darkroom does). Supporting one = deleting its entry and applying it."""

MAX_TEXT = 10_000  # a stored text option; a list option holds at most MAX_ITEMS such texts
MAX_ITEMS = 1_000


def same_value(a: Any, b: Any) -> bool:
    """Equal as option values: 1 == 1.0, texts case-insensitively, but true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, str) and isinstance(b, str):
        return a.strip().lower() == b.strip().lower()
    return a == b


def picture_problem(key: str, value: Any, where: str = "") -> str | None:
    """Why `key` = `value` cannot be honoured (None when it can): the message names the key and the way out."""
    accepted = PICTURE.get(key)
    if accepted is None or any(same_value(value, ok) for ok in accepted):
        return None
    shown = " or ".join(repr(v) for v in accepted)
    return (f"{where}{key} {value!r} is not supported: it changes the picture and Darkroom does not apply it;"
            f" leave it out or set it to {shown}")


def _kind(default: Any) -> str:
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int):
        return "a whole number"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, list):
        return "a list of texts"
    return "a text" if isinstance(default, str) else "a text or null"


def stored_value(key: str, value: Any) -> tuple[Any, str | None]:
    """`value` as kept for a webui-only option, or (None, what it should be) when its kind is wrong.

    The kind is the default's: true/false, a whole number (4.0 is taken as 4: the webui's number
    fields send floats), a finite number, a text, a list of texts (or numbers), or, for an option
    whose default is null, a text or null.
    """
    default = DEFAULTS[key]
    ok = False
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        if isinstance(value, float) and value.is_integer() and math.isfinite(value):
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif isinstance(default, list):
        ok = isinstance(value, list) and len(value) <= MAX_ITEMS and all(
            isinstance(v, (str, int, float)) and not isinstance(v, bool) and len(str(v)) <= MAX_TEXT for v in value)
    elif isinstance(default, str) or default is None:
        ok = (isinstance(value, str) and len(value) <= MAX_TEXT) or (default is None and value is None)
    if not ok:
        return None, _kind(default)
    return value, None


def valid_store(value: Any) -> bool:
    """A saved store of webui-only options: an object of known keys with values of the right kind."""
    return isinstance(value, dict) and all(
        key in DEFAULTS and key not in PICTURE and stored_value(key, v)[1] is None for key, v in value.items())
