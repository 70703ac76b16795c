"""The portable bundle (`darkroom bundle create --portable`): the launcher and the Python-free installer on a
fake frozen app, the build steps with a fake PyInstaller, and (slow) a real frozen bundle run in a Debian root
with no Python at all, inside `unshare -n` plus chroot: generate, and a server round trip over loopback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from darkroom.carry import bundle, portable
from darkroom.cli.bundle import bundle_group
from darkroom.cli.group import Context
from darkroom.home import Home

CHECKOUT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("DARKROOM_TEST_PORTABLE_CACHE", CHECKOUT / ".cache"))
SUITE = "bookworm"  # the build machine's Debian: the bundle needs its glibc (see docs/bundle.md)
FAKE_APP = """#!/bin/sh
echo "fake darkroom: $*"
"""


def _lora(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(2, 2)}, str(path))
    return path


def fake_portable(root: Path, glibc: str = "2.17", models: bool = True) -> Path:
    """A portable bundle with the real launcher, installer and manifest, and a shell script as the frozen app."""
    app = root / portable.APP
    app.mkdir(parents=True)
    (app / "darkroom").write_text(FAKE_APP)
    (app / "darkroom").chmod(0o755)
    (app / "_internal").mkdir()
    (app / "_internal" / "libfake.so").write_bytes(b"\x7fELF" + b"\0" * 100)
    if models:
        _lora(root / "models" / "loras" / "inkwash.safetensors")
        (root / "models" / "checkpoints").mkdir()
        (root / "models" / "checkpoints" / portable.KEEP).write_bytes(b"")
    portable.write_scripts(root, glibc)
    bundle.write_manifest(root, {"darkroom_version": "0.1.0", "kind": "portable",
                                 "target": {"python": "3.11", "os": "linux", "machine": "x86_64", "glibc": glibc},
                                 "models": []})
    return root


def _sh(*args: str | Path, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, **(env or {})})


# ---------------------------------------------------------------------------------------------- launcher, installer


def test_launcher_runs_the_app_with_the_carried_models(tmp_path):
    root = fake_portable(tmp_path / "b")
    p = _sh(root / "darkroom", "generate", "a cat", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"fake darkroom: --models-dir {root} generate a cat"
    # through a link (install.sh puts one on the PATH): the folder is still found
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "darkroom").symlink_to(root / "darkroom")
    p = _sh(tmp_path / "bin" / "darkroom", "serve")
    assert p.stdout.strip() == f"fake darkroom: --models-dir {root} serve"
    # no models carried: nothing extra
    bare = fake_portable(tmp_path / "bare", models=False)
    assert _sh(bare / "darkroom", "serve").stdout.strip() == "fake darkroom: serve"


def test_launcher_refuses_a_glibc_older_than_the_bundle_needs(tmp_path):
    root = fake_portable(tmp_path / "b", glibc="2.999")
    p = _sh(root / "darkroom", "serve")
    assert p.returncode == 1 and p.stdout == ""
    assert "needs glibc 2.999 or newer; this system has 2." in p.stderr


def test_install_verifies_then_copies_and_links(tmp_path):
    root = fake_portable(tmp_path / "b")
    prefix, bindir = tmp_path / "opt" / "darkroom", tmp_path / "bin"
    p = _sh("sh", root / "install.sh", "--prefix", prefix, "--bin", bindir)
    assert p.returncode == 0, p.stderr
    assert "bundle OK" in p.stderr and f'"{prefix}/darkroom" generate' in p.stdout
    assert (bindir / "darkroom").resolve() == (prefix / "darkroom").resolve()
    assert (prefix / "models" / "loras" / "inkwash.safetensors").read_bytes() == \
        (root / "models" / "loras" / "inkwash.safetensors").read_bytes()
    assert bundle.verify_bundle(prefix).problems == []  # the installed copy is a whole bundle, checkable later
    assert _sh(bindir / "darkroom", "serve").stdout.strip() == f"fake darkroom: --models-dir {prefix} serve"
    # again: the existing folder is kept unless --force
    again = _sh("sh", root / "install.sh", "--prefix", prefix, "--bin", bindir)
    assert again.returncode == 1 and "already exists" in again.stderr
    assert _sh("sh", root / "install.sh", "--prefix", prefix, "--bin", bindir, "--force").returncode == 0
    assert not list(prefix.parent.glob("*.partial-*"))


@pytest.mark.parametrize("damage", ["corrupt", "missing", "sums", "truncated-sums"])
def test_install_refuses_a_damaged_bundle_before_writing_anything(tmp_path, damage):
    root = fake_portable(tmp_path / "b")
    app_lib = root / "app" / "_internal" / "libfake.so"
    if damage == "corrupt":
        data = bytearray(app_lib.read_bytes())
        data[50] ^= 0xFF
        app_lib.write_bytes(bytes(data))
        named = "app/_internal/libfake.so"
    elif damage == "missing":
        (root / "models" / "loras" / "inkwash.safetensors").unlink()
        named = "models/loras/inkwash.safetensors"
    elif damage == "sums":  # a checksum line edited to match a changed file: SHA256SUMS no longer matches the manifest
        sums = (root / "SHA256SUMS").read_text().replace("app/_internal/libfake.so", "app/_internal/libfake.sx")
        (root / "SHA256SUMS").write_text(sums)
        named = "SHA256SUMS"
    else:  # a lost line
        (root / "SHA256SUMS").write_text("".join((root / "SHA256SUMS").read_text().splitlines(True)[1:]))
        named = "SHA256SUMS"
    prefix = tmp_path / "opt" / "darkroom"
    p = _sh("sh", root / "install.sh", "--prefix", prefix, "--bin", tmp_path / "bin")
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("darkroom: refusing to install: ") and named in last, p.stderr
    assert not (tmp_path / "opt").exists() and not (tmp_path / "bin").exists()
    assert _sh("sh", root / "install.sh", "--verify-only").returncode == 1


def test_install_verify_only_accepts_an_intact_bundle(tmp_path):
    root = fake_portable(tmp_path / "b")
    p = _sh("sh", root / "install.sh", "--verify-only", "--prefix", tmp_path / "opt")
    assert p.returncode == 0 and "bundle OK" in p.stderr
    assert not (tmp_path / "opt").exists()


def test_glibc_floor_reads_the_symbol_versions(tmp_path):
    (tmp_path / "lib.so").write_bytes(b"\x7fELF....GLIBC_2.17\0GLIBC_2.34\0GLIBC_2.2.5\0")
    (tmp_path / "notes.txt").write_bytes(b"GLIBC_2.99\0")  # not a binary
    assert portable.glibc_floor(tmp_path) == "2.34"
    host = portable.glibc_floor(Path(sys.executable).resolve().parent.parent / "lib")
    assert host.startswith("2.")


# ---------------------------------------------------------------------------------------------- build steps (fake)


class FakeBuild:
    """Stands in for venv, pip and PyInstaller: records the commands, makes the files they would make."""

    def __init__(self):
        self.commands: list[list[str]] = []

    def __call__(self, cmd: list[str]) -> None:
        self.commands.append(cmd)
        if cmd[1:3] == ["-m", "venv"]:
            (Path(cmd[3]) / "bin").mkdir(parents=True)
            (Path(cmd[3]) / "bin" / "python").write_text("")
        elif "wheel" in cmd:
            out = Path(cmd[cmd.index("--wheel-dir") + 1])
            out.mkdir(parents=True, exist_ok=True)
            (out / "darkroom-0.1.0-py3-none-any.whl").write_bytes(b"wheel")
        elif cmd[1:3] == ["-m", "PyInstaller"]:
            app = Path(cmd[cmd.index("--distpath") + 1]) / "darkroom"
            (app / "_internal").mkdir(parents=True)
            (app / "darkroom").write_text(FAKE_APP)
            (app / "darkroom").chmod(0o755)
            (app / "_internal" / "libpython3.so").write_bytes(b"\x7fELF..GLIBC_2.28\0")


def test_create_portable_builds_in_a_cached_venv_and_writes_a_checkable_bundle(tmp_path):
    home = Home(tmp_path / "home").ensure()
    _lora(home.loras / "inkwash.safetensors")
    fake, lines = FakeBuild(), []
    out = tmp_path / "portable"
    manifest = portable.create_portable(out, home=home, models=["inkwash"], build_cache=tmp_path / "cache",
                                        run=fake, echo=lines.append)
    assert manifest["kind"] == "portable" and manifest["target"]["glibc"] == "2.28"
    assert manifest["models"] == [{"path": "models/loras/inkwash.safetensors", "kind": "lora"}]
    paths = {e["path"] for e in manifest["files"]}
    assert {"darkroom", "install.sh", "README.txt", "app/darkroom", "app/_internal/libpython3.so",
            "models/loras/inkwash.safetensors", f"models/checkpoints/{portable.KEEP}"} <= paths
    assert 'need="2.28"' in (out / "darkroom").read_text()
    assert bundle.verify_bundle(out).problems == []
    assert _sh("sh", out / "install.sh", "--verify-only").returncode == 0
    flat = [" ".join(c) for c in fake.commands]
    assert any("--no-deps torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu" in c for c in flat)
    assert any(c.endswith(f"-r {CHECKOUT / portable.BUILD_REQUIREMENTS}") for c in flat)  # pinned PyInstaller
    freeze = next(c for c in fake.commands if c[1:3] == ["-m", "PyInstaller"])
    assert str(portable.ASSETS / "hooks") in freeze and freeze[-1] == str(portable.ASSETS / "entry.py")
    assert "darkroom.testing" in freeze  # excluded

    again = FakeBuild()  # the build venv is reused: no venv, no pip install of the pins
    portable.create_portable(tmp_path / "second", home=home, build_cache=tmp_path / "cache", run=again,
                             echo=lines.append)
    assert not any(c[1:3] == ["-m", "venv"] or "-r" in c for c in again.commands)


def test_cli_portable_refuses_another_platform_in_one_line(tmp_path):
    home = Home(tmp_path / "home").ensure()
    r = CliRunner().invoke(bundle_group, ["create", str(tmp_path / "b"), "--portable", "--platform",
                                          "macosx_11_0_arm64"], obj=Context(home), prog_name="darkroom bundle")
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "--portable" in r.output
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------- build root (fake)


def fake_build_root(root: Path, glibc: str = "2.31") -> Path:
    """What scripts/make_build_root.sh leaves: the root's Python (a link, as in a real root) and the stamp."""
    python = root / portable.ROOT_PYTHON.lstrip("/")
    python.parent.mkdir(parents=True)
    python.symlink_to("python3")
    (root / portable.ROOT_STAMP.lstrip("/")).write_text(f"debian bullseye, glibc {glibc}, python 3.11.2\n")
    (root / "tmp").mkdir()
    return root


class FakeRootBuild(FakeBuild):
    """Checks that each command enters the root (unshare -m, chroot, a clean env), then does its work with
    the paths the root sees mapped back to the host."""

    def __init__(self, root: Path):
        super().__init__()
        self.root, self.wrapped = root, []

    def __call__(self, cmd: list[str]) -> None:
        self.wrapped.append(cmd)
        assert cmd[:4] == ["unshare", "-m", "sh", "-ec"] and cmd[4] == portable.ENTER_ROOT
        assert cmd[6] == str(self.root)
        binds = cmd[7:cmd.index("--")]
        env_cmd = cmd[cmd.index("--") + 1:]
        assert env_cmd[:2] == ["/usr/bin/env", "-i"] and f"PATH={portable.ROOT_PATH}" in env_cmd
        inner = env_cmd[next(i for i, a in enumerate(env_cmd) if i > 1 and "=" not in a):]
        assert portable._what(cmd) == (inner[2] if inner[1] == "-m" else Path(inner[0]).name)
        assert not any(str(self.root) in a for a in inner), inner  # only paths the root sees
        super().__call__([str(self.root) + a if a.startswith("/") and not any(a.startswith(b) for b in binds)
                          else a for a in inner])


def test_create_portable_in_a_build_root_runs_every_step_inside_it(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(portable, "_host_pip_config", lambda: f"global.find-links='{tmp_path / 'wheels'}'\n")
    (tmp_path / "wheels").mkdir()
    root = fake_build_root(tmp_path / "root")
    home = Home(tmp_path / "home").ensure()
    fake, lines = FakeRootBuild(root), []
    out = tmp_path / "portable"
    manifest = portable.create_portable(out, home=home, build_root=root, run=fake, echo=lines.append,
                                        torch_index_url="none")
    assert manifest["target"]["built_on_glibc"] == "2.31" and manifest["target"]["glibc"] == "2.28"
    assert "bullseye" in manifest["target"]["build_root"]
    assert bundle.verify_bundle(out).problems == [] and (out / "app" / "darkroom").is_file()
    venv = fake.commands[0]
    assert venv[1:] == ["-m", "venv", str(root) + portable.ROOT_CACHE + venv[3].split(portable.ROOT_CACHE)[1]]
    assert fake.wrapped[0][-4] == portable.ROOT_PYTHON  # the root's CPython makes the build venv
    assert str(tmp_path / "wheels") in fake.wrapped[0]  # pip's find-links folder is bound into the root
    freeze = next(c for c in fake.commands if c[1:3] == ["-m", "PyInstaller"])
    assert freeze[-1].startswith(str(root / "tmp")) and freeze[-1].endswith("darkroom/assets/portable/entry.py")
    assert not any(root.joinpath("tmp").iterdir())  # the scratch copy of the source is gone
    assert tempfile.gettempdir() != str(root / "tmp")


def test_build_root_is_checked_before_anything_is_written(tmp_path, monkeypatch):
    home = Home(tmp_path / "home").ensure()
    out = tmp_path / "b"
    with pytest.raises(bundle.BundleError, match="is not a build root .*make_build_root.sh"):
        portable.create_portable(out, home=home, build_root=tmp_path, run=FakeBuild())
    root = fake_build_root(tmp_path / "root")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(bundle.BundleError, match="run bundle create as root"):
        portable.create_portable(out, home=home, build_root=root, run=FakeBuild())
    assert not out.exists()


def test_pip_binds_name_the_local_paths_pip_needs(tmp_path):
    (tmp_path / "wheels").mkdir()
    (tmp_path / "simple").mkdir()
    (tmp_path / "constraints.txt").write_text("")
    config = (f"global.find-links='{tmp_path / 'wheels'}'\nglobal.extra-index-url='file://{tmp_path / 'simple'}"
              f" https://example.org/simple'\nglobal.timeout='60'\n")
    binds = portable.pip_binds(config, {"PIP_CONSTRAINT": str(tmp_path / "constraints.txt"),
                                        "PIP_FIND_LINKS": str(tmp_path / "missing"), "HOME": str(tmp_path)})
    assert [b for b in binds if b.startswith(str(tmp_path))] == [
        str(tmp_path / "wheels"), str(tmp_path / "simple"), str(tmp_path / "constraints.txt")]


def test_cli_build_root_needs_portable_in_one_line(tmp_path):
    home = Home(tmp_path / "home").ensure()
    for extra in ([], ["--portable", "--platform", "win_amd64"]):
        r = CliRunner().invoke(bundle_group, ["create", str(tmp_path / "b"), "--build-root", str(tmp_path), *extra],
                               obj=Context(home), prog_name="darkroom bundle")
        assert r.exit_code == 1 and r.output.count("\n") == 1 and "--build-root" in r.output, r.output
    r = CliRunner().invoke(bundle_group, ["create", str(tmp_path / "b"), "--portable", "--build-root",
                                          str(tmp_path / "none")], obj=Context(home), prog_name="darkroom bundle")
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "make_build_root.sh" in r.output, r.output
    assert not (tmp_path / "b").exists()


def test_make_build_root_script_matches_the_option():
    script = (CHECKOUT / "scripts" / "make_build_root.sh").read_text()
    assert subprocess.run(["sh", "-n", str(CHECKOUT / "scripts" / "make_build_root.sh")]).returncode == 0
    prefix = portable.ROOT_PYTHON.rsplit("/bin/", 1)[0]
    assert f"PY_PREFIX={prefix}\n" in script and portable.ROOT_STAMP == prefix + "/.darkroom-build-root"
    assert 'STAMP=$ROOT$PY_PREFIX/.darkroom-build-root' in script and "glibc $glibc" in script  # BuildRoot.glibc
    assert "sha256sum -c" in script and "--enable-shared" in script  # pinned source; PyInstaller needs libpython
    p = _sh("sh", CHECKOUT / "scripts" / "make_build_root.sh")
    assert p.returncode == 1 and p.stderr.startswith("make_build_root: usage:")


def test_the_frozen_entry_sets_offline_first_and_the_hook_keeps_dev_code_out():
    entry = (portable.ASSETS / "entry.py").read_text()
    first_import = next(line for line in entry.splitlines() if line.startswith(("import ", "from ")) and
                        line.split()[1] not in ("runpy", "sys"))
    assert first_import.startswith("import darkroom ")
    hook = (portable.ASSETS / "hooks" / "hook-darkroom.py").read_text()
    assert "darkroom.testing" in hook and "starter_training/**" in hook


def test_the_hook_names_every_transformers_model_the_annotators_import():
    """transformers resolves its classes lazily, out of PyInstaller's sight: each model package the
    preprocessors import by name (and the backbones those load by config) must be named in the hook."""
    import re

    import transformers

    hook = (portable.ASSETS / "hooks" / "hook-darkroom.py").read_text()
    annotators = Path(portable.__file__).parents[1] / "control" / "annotators"
    names = set()
    for source in annotators.glob("*.py"):
        for group in re.findall(r"from transformers import ([\w, ]+)", source.read_text()):
            names.update(n.strip() for n in group.split(","))
    packages = {".".join(getattr(transformers, n).__module__.split(".")[:3]) for n in names}
    packages |= {"transformers.models.dinov2", "transformers.models.bit", "transformers.models.beit",
                 "transformers.models.swin"}
    assert packages and all(f'"{p}"' in hook for p in packages), sorted(p for p in packages if p not in hook)


# ---------------------------------------------------------------------------------------------- end to end (slow)


def _can_chroot() -> str | None:
    if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        return "the portable bundle is built for Linux x86-64"
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot, unshare -n)"
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-n", "-m", "true"]).returncode:
        return "needs `unshare -n -m` to run the bundle with no network"
    if shutil.which("debootstrap") is None:
        if shutil.which("apt-get") is None:
            return "needs debootstrap (apt-get install debootstrap) to make a root with no Python"
        p = subprocess.run(["apt-get", "install", "-y", "-q", "debootstrap"], capture_output=True, text=True,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if p.returncode:
            return f"debootstrap is missing and apt-get could not install it: {p.stderr.strip()[-200:]}"
    return None


def debian_root() -> Path:
    """A minimal Debian root (debootstrap minbase: no Python), made once under .cache/ and reused."""
    root = CACHE / "portable-root" / SUITE
    if (root / "etc" / "debian_version").is_file():
        return root
    partial = root.with_name(f"{SUITE}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["debootstrap", "--variant=minbase", SUITE, str(partial), "http://deb.debian.org/debian"],
                       capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    partial.rename(root)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLIENT = r"""
import base64, json, socket, sys, time, urllib.request
port, deadline = int(sys.argv[1]), time.monotonic() + 600
while True:  # wait for the server to accept (loading torch from a cold disk takes a while)
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("the server never accepted a connection")
        time.sleep(0.5)
base = f"http://127.0.0.1:{port}"
status = json.load(urllib.request.urlopen(base + "/api/status", timeout=120))
body = json.dumps({"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 1}).encode()
req = urllib.request.Request(base + "/sdapi/v1/txt2img", data=body, headers={"Content-Type": "application/json"})
images = json.load(urllib.request.urlopen(req, timeout=600))["images"]
png = base64.b64decode(images[0])
print(json.dumps({"status_keys": sorted(status), "png": png[:8].hex(), "n": len(images)}))
"""


@pytest.mark.slow
def test_portable_bundle_runs_in_a_root_with_no_python_and_no_network(tmp_path):
    """Build the frozen bundle for this machine, then inside a Debian root with no Python, with no network:
    generate from the bundle folder (a USB drive), install it, and do a server round trip over loopback."""
    why = _can_chroot()
    if why:
        pytest.skip(why)
    shm = Path("/dev/shm")
    room = shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 8e9
    scratch = Path(tempfile.mkdtemp(prefix="darkroom-portable-test-", dir=shm if room else tmp_path))
    try:
        _portable_end_to_end(tmp_path, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _portable_end_to_end(tmp_path: Path, scratch: Path) -> None:
    timings = {}
    t0 = time.monotonic()
    cached_root = debian_root()
    timings["debian root"] = time.monotonic() - t0

    creator = Home(tmp_path / "creator-home").ensure()
    _lora(creator.loras / "inkwash.safetensors")
    out = scratch / "bundle"
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "DARKROOM_HOME": str(creator.root),
           "DARKROOM_PORTABLE_BUILD_CACHE": str(CACHE / "portable-build"), "PIP_CACHE_DIR": str(CACHE / "pip")}
    code = ("from darkroom.cli import cli\nfrom darkroom.cli.bundle import bundle_group\n"
            "'bundle' in cli.commands or cli.add_command(bundle_group, 'bundle')\ncli(prog_name='darkroom')\n")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code, "bundle", "create", str(out), "--portable", "--models", "inkwash"],
                       capture_output=True, text=True, env=env, timeout=3600, cwd=tmp_path)
    timings["create"] = time.monotonic() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    manifest = json.loads((out / "manifest.json").read_text())
    size = sum(e["size"] for e in manifest["files"])
    assert manifest["kind"] == "portable" and manifest["target"]["glibc"].startswith("2.")
    assert (out / "app" / "darkroom").is_file() and (out / "darkroom").is_file()

    root = scratch / "root"
    t0 = time.monotonic()
    subprocess.run(["cp", "-a", str(cached_root), str(root)], check=True)
    subprocess.run(["cp", "-a", str(out), str(root / "bundle")], check=True)
    timings["copy in"] = time.monotonic() - t0
    assert not any((root / d / name).exists() for d in ("usr/bin", "usr/local/bin", "bin")
                   for name in ("python3", "python")), "the test root must have no Python"

    mounts = f"mount -t proc proc {root}/proc && mount --bind /dev {root}/dev && ip link set lo up"
    clean = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
             "DARKROOM_HOME": "/darkroom-home", "LANG": "C.UTF-8"}

    def in_root(script: str, timeout: int = 900) -> subprocess.CompletedProcess:
        """sh -c script inside a network namespace with only loopback and a private mount namespace."""
        return subprocess.run(["unshare", "-n", "-m", "sh", "-c", f"{mounts} && {script}"], capture_output=True,
                              text=True, timeout=timeout, env=clean)

    p = in_root(f"chroot {root} sh -c 'command -v python3 || command -v python || echo no-python'")
    assert p.stdout.strip() == "no-python", p

    # 1. straight from the bundle folder, as from a USB drive: the carried LoRA is seen, generate writes a PNG
    t0 = time.monotonic()
    p = in_root(f"chroot {root} /bundle/darkroom generate 'a red circle on a white background' --steps 4"
                " -o /out")
    timings["generate"] = time.monotonic() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    [png] = (root / "out").glob("*.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p = in_root(f"chroot {root} /bundle/darkroom models list")
    assert p.returncode == 0 and "inkwash" in p.stdout, p.stdout + p.stderr

    # 2. installed (the checks need only sh and coreutils), then a server round trip over loopback
    t0 = time.monotonic()
    p = in_root(f"chroot {root} sh /bundle/install.sh --prefix /opt/darkroom --bin /usr/local/bin")
    timings["install"] = time.monotonic() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    port = _free_port()
    client = tmp_path / "client.py"
    client.write_text(CLIENT)
    t0 = time.monotonic()
    # the launcher and the frozen app exec each other: $! is the server itself
    p = in_root(f"chroot {root} darkroom serve --port {port} > {scratch}/serve.log 2>&1 & srv=$!;"
                f" {sys.executable} {client} {port}; rc=$?; kill $srv; wait $srv; exit $rc", timeout=1200)
    timings["serve round trip"] = time.monotonic() - t0
    log = (scratch / "serve.log").read_text(errors="replace") if (scratch / "serve.log").exists() else ""
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:] + log[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["png"] == b"\x89PNG\r\n\x1a\n".hex() and result["n"] == 1
    print(f"portable bundle: {size / 1e6:.0f} MB, {len(manifest['files'])} files, glibc >= "
          f"{manifest['target']['glibc']}; timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()),
          file=sys.stderr)
