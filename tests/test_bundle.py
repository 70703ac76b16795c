"""The offline bundle: manifest, verification, the installers' refusal, model selection, the CLI,
and (slow) a real bundle for this machine installed and used inside `unshare -n`."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from packaging.requirements import Requirement
from safetensors.torch import save_file

from darkroom.carry import bundle, bundle_target
from darkroom.cli.bundle import bundle_group
from darkroom.cli.group import Context
from darkroom.home import Home

BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)  # no Darkroom importable: the checker is stdlib-only
CACHE = Path(os.environ.get("DARKROOM_TEST_BUNDLE_CACHE", Path.home() / ".cache" / "darkroom-test-bundle"))


def _can_unshare() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-n", "true"], capture_output=True).returncode == 0


def _tensor_file(path: Path, *keys: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    return path


def _native_info(**overrides) -> dict:
    target = bundle_target.make_target().as_json()
    target.update(overrides)
    return {"darkroom_version": "0.1.0", "target": target, "models": []}


def fake_bundle(root: Path, **target) -> Path:
    """A small bundle with the real installers and checker, fake wheels and a model."""
    (root / "wheels").mkdir(parents=True)
    (root / "wheels" / "alpha-1.0-py3-none-any.whl").write_bytes(b"alpha wheel" * 100)
    (root / "wheels" / "beta-2.0-py3-none-any.whl").write_bytes(b"beta wheel" * 100)
    _tensor_file(root / "models" / "loras" / "style.safetensors", "lora_unet_x.lora_down.weight")
    (root / "requirements.txt").write_text("alpha==1.0\nbeta==2.0\n")
    (root / "requirements-torch.txt").write_text("alpha==1.0\n")
    for script in bundle.SCRIPTS:
        shutil.copy(bundle.ASSETS / script, root / script)
    bundle.write_manifest(root, _native_info(**target))
    return root


def _flip_byte(path: Path, offset: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _invoke(args: list[str], home: Home | None = None):
    return CliRunner().invoke(bundle_group, args, obj=Context(home) if home else None, prog_name="darkroom bundle")


# ---------------------------------------------------------------------------------------------- manifest


def test_manifest_lists_every_file_with_size_and_hash(tmp_path):
    root = fake_bundle(tmp_path / "b")
    manifest = json.loads((root / "manifest.json").read_text())
    paths = {e["path"] for e in manifest["files"]}
    assert {"wheels/alpha-1.0-py3-none-any.whl", "models/loras/style.safetensors", "install.sh", "install.ps1",
            "bundle_check.py", "requirements.txt", "SHA256SUMS"} <= paths
    assert "manifest.json" not in paths
    entry = next(e for e in manifest["files"] if e["path"] == "wheels/beta-2.0-py3-none-any.whl")
    assert entry["size"] == 1000
    assert entry["sha256"] == bundle.checker().sha256_file(root / entry["path"])
    assert manifest["format"] == "darkroom-bundle/1" and manifest["target"]["python"] == bundle_target._host_python()
    # SHA256SUMS is `sha256sum -c` format, for checking a copy without Python
    assert f"{entry['sha256']}  {entry['path']}" in (root / "SHA256SUMS").read_text()
    assert bundle.verify_bundle(root).problems == []


def test_verify_names_corrupted_truncated_and_missing_files(tmp_path):
    root = fake_bundle(tmp_path / "b")
    _flip_byte(root / "wheels" / "alpha-1.0-py3-none-any.whl")
    (root / "models" / "loras" / "style.safetensors").write_bytes(b"short")
    (root / "wheels" / "beta-2.0-py3-none-any.whl").unlink()
    (root / "wheels" / "stray-0.1-py3-none-any.whl").write_bytes(b"not ours")
    report = bundle.verify_bundle(root)
    assert sorted(report.bad_files) == ["models/loras/style.safetensors", "wheels/alpha-1.0-py3-none-any.whl",
                                        "wheels/beta-2.0-py3-none-any.whl"]
    assert "wheels/alpha-1.0-py3-none-any.whl: corrupted (SHA-256 differs from the manifest)" in report.problems
    assert "wheels/beta-2.0-py3-none-any.whl: missing" in report.problems
    assert any(p.startswith("models/loras/style.safetensors: wrong size") for p in report.problems)
    assert report.extra == ["wheels/stray-0.1-py3-none-any.whl"]  # reported, not an error


def test_cli_verify_ok_bad_and_not_a_bundle(tmp_path):
    root = fake_bundle(tmp_path / "b")
    (root / "notes.txt").write_text("mine")
    ok = _invoke(["verify", str(root)])
    assert ok.exit_code == 0, ok.output
    assert "OK: " in ok.output and "notes.txt is not in the manifest (ignored)" in ok.output

    _flip_byte(root / "install.sh", 0)
    bad = _invoke(["verify", str(root)])
    assert bad.exit_code == 1
    assert bad.output.strip().splitlines()[-1] == (f"error: 1 bad file(s) in {root}: install.sh [DR-BUNDLE]"
                                                   " (darkroom help DR-BUNDLE)")

    (tmp_path / "empty").mkdir()
    none = _invoke(["verify", str(tmp_path / "empty")])
    assert none.exit_code == 1
    assert none.output.startswith("error: ") and "manifest.json not found" in none.output
    assert len(none.output.strip().splitlines()) == 1

    (root / "manifest.json").write_text("{ not json")
    broken = _invoke(["verify", str(root)])
    assert broken.exit_code == 1 and "unreadable (corrupted?)" in broken.output


# ---------------------------------------------------------------------------------------------- installers


def _install(root: Path, tmp_path: Path, *args: str, verify_only: bool = False, python: str = BASE_PYTHON):
    env = {**os.environ, "PYTHON": python, "DARKROOM_HOME": str(tmp_path / "home"),
           "DARKROOM_VENV": str(tmp_path / "venv")}
    env.pop("DARKROOM_BUNDLE_VERIFY_ONLY", None)
    if verify_only:
        env["DARKROOM_BUNDLE_VERIFY_ONLY"] = "1"
    return subprocess.run(["bash", str(root / "install.sh"), *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_install_sh_verification_stage_accepts_an_intact_bundle(tmp_path):
    root = fake_bundle(tmp_path / "b")
    p = _install(root, tmp_path, verify_only=True)
    assert p.returncode == 0, p.stderr
    assert "bundle OK" in p.stderr
    assert not (tmp_path / "venv").exists()


def test_install_sh_refuses_a_corrupted_or_missing_file_before_touching_anything(tmp_path):
    root = fake_bundle(tmp_path / "b")
    _flip_byte(root / "wheels" / "beta-2.0-py3-none-any.whl")
    (root / "models" / "loras" / "style.safetensors").unlink()
    p = _install(root, tmp_path)  # the real script, no stubs: it must stop before making the venv
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("darkroom: refusing to install: 2 file(s)")
    assert "wheels/beta-2.0-py3-none-any.whl" in last and "models/loras/style.safetensors" in last
    assert "wheels/beta-2.0-py3-none-any.whl: corrupted" in p.stderr
    assert not (tmp_path / "venv").exists() and not (tmp_path / "home").exists()


def test_install_sh_refuses_a_bundle_for_another_python_or_system(tmp_path):
    root = fake_bundle(tmp_path / "b", python="3.99", os="windows", machine="x86_64")
    p = _install(root, tmp_path, verify_only=True)
    assert p.returncode == 1
    assert "this bundle is for windows x86_64 with Python 3.99" in p.stderr
    assert "set PYTHON to a Python 3.99 interpreter" in p.stderr


def test_install_sh_keeps_an_existing_venv_unless_forced(tmp_path):
    root = fake_bundle(tmp_path / "b")
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / "mine").write_text("x")
    p = _install(root, tmp_path)
    assert p.returncode == 1 and "already exists" in p.stderr and "--force" in p.stderr
    assert (tmp_path / "venv" / "mine").exists()
    assert _install(root, tmp_path, "--bogus").returncode == 2


def test_install_models_copies_into_the_home_and_never_overwrites(tmp_path):
    root = fake_bundle(tmp_path / "b")
    home = tmp_path / "home"
    env = {**os.environ, "DARKROOM_HOME": str(home)}
    run = lambda: subprocess.run([sys.executable, str(root / "bundle_check.py"), "install-models", str(root)],
                                 capture_output=True, text=True, env=env, timeout=60)
    p = run()
    assert p.returncode == 0, p.stderr
    copied = home / "models" / "loras" / "style.safetensors"
    assert copied.read_bytes() == (root / "models" / "loras" / "style.safetensors").read_bytes()
    assert "already there" in run().stderr
    copied.write_bytes(b"the user's own, different file")
    p = run()
    assert p.returncode == 0 and "kept your existing" in p.stderr
    assert copied.read_bytes() == b"the user's own, different file"
    assert not list(home.rglob("*.partial"))


# ---------------------------------------------------------------------------------------------- models


@pytest.fixture
def model_home(tmp_path) -> Home:
    home = Home(tmp_path / "home").ensure()
    _tensor_file(home.checkpoints / "dreamy.safetensors", "cond_stage_model.transformer.x")
    _tensor_file(home.loras / "inkwash.safetensors", "lora_unet_a.lora_down.weight")
    _tensor_file(home.vae / "clearvae.safetensors", "encoder.conv_in.weight")
    _tensor_file(home.embeddings / "badhands.safetensors", "emb_params")
    return home


def test_models_by_name_land_in_their_kind_folders(model_home, tmp_path):
    outside = _tensor_file(tmp_path / "usb" / "detail.safetensors", "lora_te_text.lora_down.weight")
    chosen, notes = bundle.resolve_models(model_home, ["dreamy", "inkwash", "ClearVAE.safetensors", "badhands",
                                                       str(outside), "darkroom-starter"])
    assert [(m.path.name, m.kind, m.dest) for m in chosen] == [
        ("dreamy.safetensors", "checkpoint", "models/checkpoints/dreamy.safetensors"),
        ("inkwash.safetensors", "lora", "models/loras/inkwash.safetensors"),
        ("clearvae.safetensors", "vae", "models/vae/clearvae.safetensors"),
        ("badhands.safetensors", "embedding", "models/embeddings/badhands.safetensors"),
        ("detail.safetensors", "lora", "models/loras/detail.safetensors"),
    ]
    assert notes == ["darkroom-starter is built in: it ships inside Darkroom's wheel, nothing to copy"]
    out = tmp_path / "bundle"
    hashes = bundle.copy_models(chosen, out)
    assert (out / "models" / "embeddings" / "badhands.safetensors").read_bytes() == \
        (model_home.embeddings / "badhands.safetensors").read_bytes()
    assert hashes["models/loras/detail.safetensors"] == bundle.checker().sha256_file(outside)


def test_models_from_another_install_are_found_in_place(tmp_path):
    a1111 = tmp_path / "webui"
    _tensor_file(a1111 / "models" / "Lora" / "pastel.safetensors", "lora_unet_a.lora_down.weight")
    home = Home(tmp_path / "home", extra_model_dirs=[a1111]).ensure()
    [model], _ = bundle.resolve_models(home, ["pastel"])
    assert model.kind == "lora" and model.path == (a1111 / "models" / "Lora" / "pastel.safetensors").resolve()


def test_model_errors_are_one_line_and_list_what_exists(model_home, tmp_path):
    with pytest.raises(bundle.BundleError) as e:
        bundle.resolve_models(model_home, ["nosuch"])
    msg = str(e.value)
    assert msg.startswith("no model named 'nosuch' (checkpoints: ")
    assert "dreamy" in msg and "loras: inkwash" in msg and "vae: clearvae" in msg and "embeddings: badhands" in msg
    with pytest.raises(bundle.BundleError, match="model file not found: ./missing.safetensors"):
        bundle.resolve_models(model_home, ["./missing.safetensors"])
    odd = _tensor_file(tmp_path / "odd.safetensors", "something.else")
    with pytest.raises(bundle.BundleError, match="not a model Darkroom can use"):
        bundle.resolve_models(model_home, [str(odd)])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        _tensor_file(tmp_path / d / "same.safetensors", "lora_unet_a.lora_down.weight")
    with pytest.raises(bundle.BundleError, match="two models would be models/loras/same.safetensors"):
        bundle.resolve_models(model_home, [str(tmp_path / "a" / "same.safetensors"),
                                           str(tmp_path / "b" / "same.safetensors")])


# ---------------------------------------------------------------------------------------------- target


def test_targets_platform_tags_and_markers():
    t = bundle_target.make_target(["manylinux2014_x86_64"], "3.12", "cu128")
    assert (t.os, t.machine, t.python) == ("linux", "x86_64", "3.12")
    assert t.platforms[:2] == ("manylinux_2_17_x86_64", "manylinux2014_x86_64") and "manylinux1_x86_64" in t.platforms
    assert "manylinux_2_28_x86_64" in bundle_target.expand_platform("manylinux_2_28_x86_64")
    assert bundle_target.torch_requirement("2.13.0", t) == ("torch==2.13.0+cu128", "https://download.pytorch.org/whl/cu128")
    args = t.pip_args()
    assert args[:5] == ["--only-binary=:all:", "--implementation", "cp", "--python-version", "3.12"]

    win = bundle_target.make_target(["win_amd64"], "3.11")
    env = bundle_target.marker_environment(win)
    assert (env["sys_platform"], env["platform_system"], env["platform_machine"]) == ("win32", "Windows", "AMD64")
    assert bundle_target.torch_requirement("2.13.0", win) == ("torch==2.13.0+cpu", "https://download.pytorch.org/whl/cpu")

    mac = bundle_target.make_target(["macosx_11_0_arm64"])
    assert bundle_target.torch_requirement("2.13.0", mac) == ("torch==2.13.0", None)
    with pytest.raises(bundle.BundleError, match="no CUDA/ROCm build"):
        bundle_target.torch_requirement("2.13.0", bundle_target.make_target(["macosx_11_0_arm64"], torch="cu124"))

    native = bundle_target.make_target()
    assert native.native and native.pip_args() == ["--only-binary=:all:"]


# ---------------------------------------------------------------------------------------------- create (fake pip)


def _fake_wheel(folder: Path, name: str, version: str, requires: list[str] = ()) -> Path:
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
    return path


class FakePip:
    """Stands in for pip: records the calls, 'downloads' a fake wheel per pinned requirement."""

    DEPS = {"click": ['colorama; platform_system == "Windows"'],
            "torch": ["filelock", 'nvidia-nccl; platform_system == "Linux"']}

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, args: list[str]) -> None:
        self.calls.append(args)
        if args[0] == "wheel":
            out = Path(args[args.index("--wheel-dir") + 1])
            out.mkdir(parents=True, exist_ok=True)
            _fake_wheel(out, "darkroom", "0.1.0", ["torch>=2.4", "click>=8"])
            return
        dest = Path(args[args.index("--dest") + 1])
        reqs = Path(args[-1]).read_text().split() if "-r" in args else [args[-1]]
        for req in reqs:
            name, _, version = req.partition("==")
            _fake_wheel(dest, name, version or "1.0", self.DEPS.get(name, []))
            for dep in [] if "--no-deps" in args else self.DEPS.get(name, []):
                r = Requirement(dep)
                if not r.marker or r.marker.evaluate():  # pip evaluates markers for *this* machine
                    _fake_wheel(dest, r.name, "1.0")


def _fake_source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "darkroom").mkdir(parents=True)
    (src / "darkroom" / "__init__.py").write_text("")
    (src / "pyproject.toml").write_text('[project]\nname = "darkroom"\n')
    (src / "requirements.txt").write_text("# pins\ntorch==2.13.0\nclick==8.5.1  # cli\n")
    (src / "requirements-dev.txt").write_text("pytest==9.2.0\n")
    return src


def test_create_bundle_orchestration(tmp_path, model_home):
    pip = FakePip()
    out = tmp_path / "bundle"
    manifest = bundle.create_bundle(out, home=model_home, models=["inkwash"], source=_fake_source(tmp_path),
                                    pip=pip, echo=lambda s: None)
    kinds = [c[0] for c in pip.calls]
    assert kinds == ["wheel", "download", "download"]
    torch_call, rest_call = pip.calls[1], pip.calls[2]
    assert torch_call[-1] == "torch==2.13.0+cpu" and "--no-deps" in torch_call
    assert torch_call[torch_call.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    assert "--index-url" not in rest_call  # only torch is looked up on the torch index
    assert rest_call[rest_call.index("--find-links") + 1] == str(out / "wheels")
    assert (out / "requirements-torch.txt").read_text() == "torch==2.13.0+cpu\n"
    linux = ["nvidia-nccl==1.0"] if platform.system() == "Linux" else []
    assert (out / "requirements.txt").read_text().split() == ["click==8.5.1", "darkroom==0.1.0", "filelock==1.0",
                                                              *linux, "torch==2.13.0+cpu"]
    assert not list((out / "wheels").glob("pytest*"))  # dev requirements are not bundled
    assert {m["path"] for m in manifest["models"]} == {"models/loras/inkwash.safetensors"}
    assert manifest["target"]["torch_requirement"] == "torch==2.13.0+cpu"
    assert os.access(out / "install.sh", os.X_OK)
    assert bundle.verify_bundle(out).problems == []
    with pytest.raises(bundle.BundleError, match="is not an empty folder"):
        bundle.create_bundle(out, home=model_home, source=_fake_source(tmp_path / "again"), pip=pip)


def test_no_deps_requirements_travel_without_their_declared_dependencies(tmp_path, model_home):
    """spandrel declares torchvision, which must never be installed: requirements-nodeps.txt is downloaded and
    installed with --no-deps, and nothing in the bundle asks for torchvision."""
    pip = FakePip()
    pip.DEPS = {**FakePip.DEPS, "spandrel": ["torchvision", "einops"]}
    src = _fake_source(tmp_path)
    (src / "requirements-nodeps.txt").write_text("# see the file\nspandrel==0.4.2\neinops==0.8.2\n")
    out = tmp_path / "bundle"
    manifest = bundle.create_bundle(out, home=model_home, source=src, pip=pip, echo=lambda s: None)
    last = pip.calls[-1]
    assert "--no-deps" in last and Path(last[-1]).name == "requirements.txt"
    assert not list((out / "wheels").glob("torchvision*"))
    assert (out / "requirements-nodeps.txt").read_text().split() == ["einops==0.8.2", "spandrel==0.4.2"]
    assert not {"spandrel", "einops"} & {r.split("==")[0] for r in (out / "requirements.txt").read_text().split()}
    assert manifest["install"]["then_no_deps"] == "requirements-nodeps.txt"
    assert 'pip_offline --no-deps -r "$HERE/requirements-nodeps.txt"' in (out / "install.sh").read_text()
    assert bundle.verify_bundle(out).problems == []


def test_create_for_another_system_adds_what_its_markers_need(tmp_path, model_home):
    """pip evaluates markers for the machine it runs on: click's colorama only counts on Windows."""
    pip = FakePip()
    out = tmp_path / "bundle"
    bundle.create_bundle(out, home=model_home, platforms=["win_amd64"], python_version="3.12",
                         torch_index_url="none", source=_fake_source(tmp_path), pip=pip, echo=lambda s: None)
    assert "--index-url" not in pip.calls[1]
    assert pip.calls[1][pip.calls[1].index("--platform") + 1] == "win_amd64"
    assert all("--no-deps" in c for c in pip.calls[1:])  # the target's markers decide, not this machine's
    assert len(pip.calls) == 4  # wheel, torch, the pins, then their dependencies for Windows
    assert (out / "requirements.txt").read_text().split() == ["click==8.5.1", "colorama==1.0", "darkroom==0.1.0",
                                                              "filelock==1.0", "torch==2.13.0+cpu"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["os"] == "windows" and manifest["target"]["python"] == "3.12"


def test_cli_create_errors_are_one_line_and_happen_before_any_download(tmp_path, model_home):
    cases = [
        (["--models", "nosuch"], "error: no model named 'nosuch' (checkpoints: "),
        (["--torch", "cuda"], "error: --torch 'cuda': use cpu, a CUDA build"),
        (["--python-version", "3"], "error: --python-version '3': give MAJOR.MINOR"),
        (["--platform", "toaster"], "error: --platform toaster: give wheel platform tags"),
        (["--platform", "macosx_11_0_arm64", "--torch", "cu124"], "error: --torch cu124: torch for macOS has no"),
        (["--source", str(tmp_path)], f"error: {tmp_path} is not a Darkroom checkout"),
    ]
    for args, start in cases:
        r = _invoke(["create", str(tmp_path / "out"), *args], model_home)
        assert r.exit_code == 1, (args, r.output)
        assert r.output.startswith(start), (args, r.output)
        assert len(r.output.strip().splitlines()) == 1, r.output
        assert not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    r = _invoke(["create", str(tmp_path / "full")], model_home)
    assert r.exit_code == 1 and "is not an empty folder" in r.output


# ---------------------------------------------------------------------------------------------- end to end


def _run_cli_code() -> str:
    return ("from darkroom.cli import cli\nfrom darkroom.cli.bundle import bundle_group\n"
            "'bundle' in cli.commands or cli.add_command(bundle_group, 'bundle')\ncli(prog_name='darkroom')\n")


@pytest.mark.slow
@pytest.mark.skipif(not _can_unshare(), reason="needs `unshare -n` (root, Linux) to prove the install is offline")
def test_bundle_for_this_machine_installs_and_generates_with_no_network(tmp_path):
    """Create a real bundle (network: pip), then install it and generate inside `unshare -n` (no network)."""
    # the bundle and the venv (~1.6 GB, ~20k files) go to RAM where there is room: deleting them from a disk
    # mounted with online discard takes ~90 s, from tmpfs well under one
    shm = Path("/dev/shm")
    room = shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 6e9
    scratch = Path(tempfile.mkdtemp(prefix="darkroom-bundle-test-", dir=shm if room else tmp_path))
    try:
        _bundle_end_to_end(tmp_path, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _bundle_end_to_end(tmp_path: Path, scratch: Path) -> None:
    timings = {}
    out = scratch / "bundle"
    creator = Home(tmp_path / "creator-home").ensure()
    _tensor_file(creator.loras / "inkwash.safetensors", "lora_unet_a.lora_down.weight")
    # pip's cache (where the index allows caching) makes reruns cheaper; the downloads run through pip either way
    env = {**os.environ, "DARKROOM_HOME": str(creator.root), "PIP_CACHE_DIR": str(CACHE / "pip")}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", _run_cli_code(), "bundle", "create", str(out), "--models", "inkwash"],
                       capture_output=True, text=True, env=env, timeout=1800, cwd=tmp_path)
    timings["create"] = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    names = {Path(e["path"]).name.split("-")[0].lower() for e in manifest["files"] if e["path"].startswith("wheels/")}
    assert {"darkroom", "torch", "diffusers", "transformers", "fastapi"} <= names
    assert not names & {"pytest", "ruff", "playwright", "webuiapi", "openai"}  # dev-only requirements stay out
    assert (out / "requirements-torch.txt").read_text().startswith("torch==2.13.0+cpu")

    venv, home = scratch / "venv", tmp_path / "home"
    # the host's pip configuration (find-links, extra indexes, PIP_* variables) stays in the environment: the
    # installer must ignore it, and with no network only the bundle's wheels can be used anyway
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of this checkout may leak in
    env = {**clean, "PYTHON": BASE_PYTHON, "DARKROOM_HOME": str(home)}
    t0 = time.monotonic()
    p = subprocess.run(["unshare", "-n", "bash", str(out / "install.sh"), "--venv", str(venv)],
                       capture_output=True, text=True, env=env, timeout=1800, cwd=tmp_path)
    timings["install"] = time.monotonic() - t0
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    assert f"{venv}/bin/darkroom\" generate" in p.stdout
    assert (home / "models" / "loras" / "inkwash.safetensors").read_bytes() == \
        (creator.loras / "inkwash.safetensors").read_bytes()
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import darkroom; print(darkroom.__file__)"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path, env=clean)
    assert where.stdout.startswith(str(venv)), where  # the bundle's Darkroom, not this checkout

    t0 = time.monotonic()
    p = subprocess.run(["unshare", "-n", str(venv / "bin" / "darkroom"), "generate",
                        "a red circle on a white background", "-o", str(tmp_path / "out"), "--steps", "4"],
                       capture_output=True, text=True, env={**clean, "DARKROOM_HOME": str(home)}, timeout=600,
                       cwd=tmp_path)
    timings["generate"] = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    [png] = (tmp_path / "out").glob("*.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    torch_wheel = next((out / "wheels").glob("torch-*.whl"))
    _flip_byte(torch_wheel, torch_wheel.stat().st_size // 2)
    p = subprocess.run(["unshare", "-n", "bash", str(out / "install.sh"), "--venv", str(scratch / "venv2")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 1
    assert f"wheels/{torch_wheel.name}" in p.stderr.strip().splitlines()[-1]
    assert "refusing to install" in p.stderr and not (scratch / "venv2").exists()
    timings["verify"] = time.monotonic()
    r = _invoke(["verify", str(out)])
    timings["verify"] = time.monotonic() - timings["verify"]
    assert r.exit_code == 1 and r.output.strip().endswith(f"wheels/{torch_wheel.name} [DR-BUNDLE]"
                                                          " (darkroom help DR-BUNDLE)")
    print("bundle timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), file=sys.stderr)


def test_powershell_installer_does_what_install_sh_does():
    """No PowerShell here to run it: at least the same steps, flags and switches."""
    ps1 = (bundle.ASSETS / "install.ps1").read_text()
    for needle in ("bundle_check.py\") verify", "DARKROOM_BUNDLE_VERIFY_ONLY", "-m venv", "--isolated", "--no-index",
                   "PIP_CONFIG_FILE", "requirements-torch.txt", "install-models", "bundle_update.py",
                   "prepare $Here $Venv @ForceArg", "self-check", "commit", "-Rollback"):
        assert needle in ps1, needle
    assert ps1.index("requirements-torch.txt") < ps1.index('"requirements.txt"')


def test_a_failed_download_is_one_line_naming_the_cause(tmp_path, model_home):
    lines = []
    with pytest.raises(bundle.BundleError) as e:  # the real pip, offline: no index, nothing to find
        bundle.run_pip(["download", "--no-index", "--dest", str(tmp_path), "no-such-package-darkroom==1.0"],
                       echo=lines.append)
    assert str(e.value) == "pip download failed: No matching distribution found for no-such-package-darkroom==1.0"
    assert any(line.startswith("ERROR:") for line in lines)

    def failing_pip(args):
        if args[0] == "download":
            raise bundle.BundleError("pip download failed: no route to host")
        FakePip()(args)

    with pytest.raises(bundle.BundleError, match=r"no route to host \(.*bundle is incomplete: delete it before"):
        bundle.create_bundle(tmp_path / "bundle", home=model_home, source=_fake_source(tmp_path), pip=failing_pip,
                             echo=lambda s: None)
    assert not (tmp_path / "bundle" / "manifest.json").exists()


def test_models_whose_names_differ_only_in_case_are_refused(model_home):
    """A bundle travels on FAT/exFAT drives, which keep Inkwash and inkwash as one file."""
    _tensor_file(model_home.loras / "Inkwash.safetensors", "lora_unet_b.lora_down.weight")
    with pytest.raises(bundle.BundleError, match="letter case"):
        bundle.resolve_models(model_home, [str(model_home.loras / "inkwash.safetensors"),
                                           str(model_home.loras / "Inkwash.safetensors")])
