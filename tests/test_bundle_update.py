"""Updates by USB: `bundle create --since` carries only what changed; install.sh applies an update to an installed
venv (verify, base check, new venv, self-check, switch) and `--rollback` returns to the version before.

The install tests run the real install.sh, venv and pip on tiny real wheels (a fake `darkroom` console script),
so no download and no torch are needed."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from darkroom.carry import bundle, update
from tests import test_bundle
from tests.test_bundle import BASE_PYTHON, FakePip, _fake_source, _flip_byte, _invoke, _native_info, _tensor_file

# ---------------------------------------------------------------------------------------------- create --since


class VersionedPip(FakePip):
    """FakePip whose Darkroom wheel has a chosen version (a newer checkout)."""

    def __init__(self, version: str = "0.1.0"):
        super().__init__()
        self.version = version

    def __call__(self, args: list[str]) -> None:
        if args[0] != "wheel":
            return super().__call__(args)
        self.calls.append(args)
        out = Path(args[args.index("--wheel-dir") + 1])
        out.mkdir(parents=True, exist_ok=True)
        _fixed_fake_wheel(out, "darkroom", self.version, ["torch>=2.4", "click>=8"])


def _fixed_fake_wheel(folder: Path, name: str, version: str, requires: list[str] = ()) -> Path:
    """test_bundle's fake wheel with fixed dates: downloaded again, the same release is the same bytes (as on PyPI)."""
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(zipfile.ZipInfo(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", (2025, 1, 1, 0, 0, 0)),
                   meta)
    return path


@pytest.fixture(autouse=True)
def _same_bytes(monkeypatch):
    monkeypatch.setattr(test_bundle, "_fake_wheel", _fixed_fake_wheel)


def _create(out: Path, home, src: Path, version: str, **kw) -> dict:
    return bundle.create_bundle(out, home=home, source=src, pip=VersionedPip(version), echo=lambda s: None, **kw)


@pytest.fixture
def model_home(tmp_path):
    from darkroom.home import Home

    home = Home(tmp_path / "home").ensure()
    _tensor_file(home.loras / "inkwash.safetensors", "lora_unet_a.lora_down.weight")
    _tensor_file(home.loras / "pastel.safetensors", "lora_unet_b.lora_down.weight")
    return home


def test_since_carries_only_what_changed_and_names_its_base(tmp_path, model_home):
    src = _fake_source(tmp_path)
    (src / "requirements.txt").write_text("torch==2.13.0\nclick==8.5.1\ntqdm==4.0\n")
    old = tmp_path / "old"
    _create(old, model_home, src, "0.1.0", models=["inkwash"])
    (src / "requirements.txt").write_text("torch==2.13.0\nclick==8.6.0\n")  # click updated, tqdm dropped
    new = tmp_path / "new"
    manifest = _create(new, model_home, src, "0.2.0", models=["inkwash", "pastel"], since=old)

    carried = sorted(p.relative_to(new).as_posix() for p in new.rglob("*") if p.is_file()
                     and p.parent.name in ("wheels", "loras"))
    assert carried == ["models/loras/pastel.safetensors", "wheels/click-8.6.0-py3-none-any.whl",
                       "wheels/darkroom-0.2.0-py3-none-any.whl"]  # torch, its deps and inkwash are on the machine
    u = manifest["update"]
    assert manifest["kind"] == "update" and manifest["darkroom_version"] == "0.2.0"
    assert u["base"] == {"manifest_sha256": hashlib.sha256((old / "manifest.json").read_bytes()).hexdigest(),
                         "darkroom_version": "0.1.0"}
    assert u["replaces"] == {"wheels/click-8.6.0-py3-none-any.whl": "wheels/click-8.5.1-py3-none-any.whl",
                             "wheels/darkroom-0.2.0-py3-none-any.whl": "wheels/darkroom-0.1.0-py3-none-any.whl"}
    assert u["adds"] == ["models/loras/pastel.safetensors"]
    assert u["removes"] == ["wheels/tqdm-4.0-py3-none-any.whl"]
    # the whole new version is described: the installer takes the rest from the installed version
    assert {"wheels/torch-2.13.0+cpu-py3-none-any.whl", "wheels/darkroom-0.2.0-py3-none-any.whl"} <= \
        {e["path"] for e in u["wheels"]}
    assert not any("tqdm" in e["path"] for e in u["wheels"])
    assert [e["path"] for e in u["models"]] == ["models/loras/inkwash.safetensors", "models/loras/pastel.safetensors"]
    assert [m["path"] for m in manifest["models"]] == ["models/loras/pastel.safetensors"]
    assert "tqdm" not in (new / "requirements.txt").read_text()
    assert bundle.verify_bundle(new).problems == []
    assert {"install.sh", "bundle_update.py", "bundle_check.py"} <= {p.name for p in new.iterdir()}

    # the manifest alone is enough as --since, and updates chain (an update is a base too)
    again = _create(tmp_path / "again", model_home, src, "0.2.0", since=old / "manifest.json")
    assert again["update"]["base"] == u["base"]
    chained = _create(tmp_path / "chained", model_home, src, "0.3.0", models=["pastel"], since=new)
    assert chained["update"]["base"]["darkroom_version"] == "0.2.0"
    assert [e["path"] for e in chained["update"]["models"]] == [e["path"] for e in u["models"]]
    assert {p.name for p in (tmp_path / "chained" / "wheels").iterdir()} == {"darkroom-0.3.0-py3-none-any.whl"}


def test_since_errors_come_before_any_download(tmp_path, model_home):
    src = _fake_source(tmp_path)
    old = tmp_path / "old"
    _create(old, model_home, src, "0.1.0")
    for kw, message in [({"python_version": "3.99"}, "give the same --platform and --python-version"),
                        ({"since": tmp_path / "nothing-here"}, "cannot read"),
                        ({"since": src / "requirements.txt"}, "unreadable")]:
        pip = VersionedPip()
        with pytest.raises(bundle.BundleError, match=message):
            bundle.create_bundle(tmp_path / "out", home=model_home, source=src, pip=pip, echo=lambda s: None,
                                 **{"since": old, **kw})
        assert pip.calls == [] and not (tmp_path / "out").exists()
    r = _invoke(["create", str(tmp_path / "out"), "--since", str(old), "--portable"], model_home)
    assert r.exit_code == 1 and "a portable bundle is made whole" in r.output


def test_cli_create_since_reports_the_update(tmp_path, model_home, monkeypatch):
    src = _fake_source(tmp_path)
    old = tmp_path / "old"
    _create(old, model_home, src, "0.1.0")
    monkeypatch.setattr(bundle, "run_pip", lambda args, echo: VersionedPip("0.2.0")(args))
    r = _invoke(["create", str(tmp_path / "new"), "--since", str(old), "--source", str(src)], model_home)
    assert r.exit_code == 0, r.output
    assert "(darkroom 0.1.0 -> 0.2.0: 0 added, 1 replaced, 0 removed)" in r.output
    assert "install.sh --rollback" in r.output


# ---------------------------------------------------------------------------------------------- install (real pip)


def _wheel(folder: Path, name: str, version: str, files: dict[str, str], entry_points: str = "") -> Path:
    """A real, installable wheel (METADATA, WHEEL, RECORD with hashes)."""
    dist = f"{name}-{version}.dist-info"
    files = {**files, f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    if entry_points:
        files[f"{dist}/entry_points.txt"] = entry_points
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join(record + [f"{dist}/RECORD,,"]) + "\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for name_, text in files.items():  # fixed dates: the same wheel built twice is the same bytes
            z.writestr(zipfile.ZipInfo(name_, date_time=(2025, 1, 1, 0, 0, 0)), text)
    return path


FAKE_CLI = '''import pathlib, sys
import alpha

def main():
    args = sys.argv[1:]
    if args == ["--version"]:
        print("darkroom, version {version}")
        return 0
    if args[:1] == ["generate"]:
        if {broken}:
            print("RuntimeError: this build cannot generate", file=sys.stderr)
            return 1
        out = pathlib.Path(args[args.index("-o") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "00000.png").write_bytes(b"png with alpha " + alpha.VERSION.encode())
        return 0
    return 2
'''


def full_bundle(root: Path, version: str, alpha: str = "1.0", *, broken: bool = False,
                loras: dict[str, str] = {}) -> Path:  # noqa: B006 (read only)
    """A wheel bundle with the real installers: a fake Darkroom (console script) that needs alpha."""
    wheels = root / "wheels"
    _wheel(wheels, "darkroom", version, {"darkroom/__init__.py": "", "darkroom/cli.py": FAKE_CLI.format(
        version=version, broken=broken)}, "[console_scripts]\ndarkroom = darkroom.cli:main\n")
    _wheel(wheels, "alpha", alpha, {"alpha.py": f"VERSION = {alpha!r}\n"})
    for name, key in loras.items():
        _tensor_file(root / "models" / "loras" / name, key)
    (root / "requirements-torch.txt").write_text(f"alpha=={alpha}\n")
    (root / "requirements.txt").write_text(f"alpha=={alpha}\ndarkroom=={version}\n")
    for script in bundle.SCRIPTS:
        shutil.copy(bundle.ASSETS / script, root / script)
    bundle.write_manifest(root, {**_native_info(), "darkroom_version": version,
                                 "models": [{"path": f"models/loras/{n}", "kind": "lora"} for n in loras]})
    return root


def update_bundle(root: Path, since: Path, version: str, alpha: str = "1.0", **kw) -> Path:
    """An update made the way `bundle create --since` makes it: a full bundle, pruned against the base."""
    full_bundle(root, version, alpha, **kw)
    info = json.loads((root / "manifest.json").read_text())
    info = {k: v for k, v in info.items() if k not in ("files", "format")}
    info = update.prune_to_update(root, update.load_base(since), info, lambda s: None)
    (root / "manifest.json").unlink()
    (root / "SHA256SUMS").unlink()
    bundle.write_manifest(root, info)
    return root


def _sh(root: Path, env: dict, *args: str):
    return subprocess.run(["bash", str(root / "install.sh"), *args], capture_output=True, text=True, env=env,
                          timeout=600)


def _version(venv: Path) -> str:
    return subprocess.run([str(venv / "bin" / "darkroom"), "--version"], capture_output=True, text=True,
                          timeout=60).stdout.strip()


def _alpha(venv: Path) -> str:
    return subprocess.run([str(venv / "bin" / "python"), "-c", "import alpha; print(alpha.VERSION)"],
                          capture_output=True, text=True, timeout=60).stdout.strip()


class Install:
    def __init__(self, tmp: Path):
        self.tmp, self.venv, self.home = tmp, tmp / "venv", tmp / "home"
        self.env = {**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DARKROOM_BUNDLE_VERIFY_ONLY")},
                    "PYTHON": BASE_PYTHON, "DARKROOM_HOME": str(self.home), "DARKROOM_VENV": str(self.venv)}
        self.base = full_bundle(tmp / "v1", "0.1.0", loras={"inkwash.safetensors": "lora_unet_a.lora_down.weight"})
        p = _sh(self.base, self.env)
        assert p.returncode == 0, p.stderr
        # the user's work since: history, outputs, settings, a model of their own
        self.mine = {"history.sqlite3": b"SQLite format 3\x00 history", "outputs/2025-01-01/00000-1.png": b"png",
                     "settings.json": b'{"steps": 30}', "models/loras/mine.safetensors": b"my lora"}
        for rel, data in self.mine.items():
            (self.home / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.home / rel).write_bytes(data)

    def state(self) -> tuple:
        return (os.readlink(self.venv), _version(self.venv), sorted(p.name for p in self.versions.iterdir()))

    @property
    def versions(self) -> Path:
        return self.tmp / "venv.versions"

    def home_kept(self) -> bool:
        return all((self.home / rel).read_bytes() == data for rel, data in self.mine.items())


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Install:
    """Darkroom 0.1.0 installed by install.sh, left as it is by every test that uses it (they are refused)."""
    return Install(tmp_path_factory.mktemp("installed"))


def test_install_records_its_bundle_in_a_versioned_venv(installed):
    venv = installed.venv
    assert venv.is_symlink() and _version(venv) == "darkroom, version 0.1.0"
    [version] = [p for p in installed.versions.iterdir() if p.is_dir()]
    record = json.loads((version / update.installer().RECORD).read_text())
    assert record["manifest_sha256"] == hashlib.sha256((installed.base / "manifest.json").read_bytes()).hexdigest()
    assert record["darkroom_version"] == "0.1.0"
    assert (version / "bundle-wheels" / "alpha-1.0-py3-none-any.whl").is_file()
    assert (installed.versions / "bundle_update.py").is_file()  # rollback works without the USB drive
    assert (installed.home / "models" / "loras" / "inkwash.safetensors").is_file()
    again = _sh(installed.base, installed.env)
    assert again.returncode == 1 and "already exists (Darkroom 0.1.0" in again.stderr and "--force" in again.stderr


def test_update_applies_in_place_keeps_the_home_and_rolls_back(tmp_path):
    inst = Install(tmp_path)
    before = inst.state()
    upd = update_bundle(tmp_path / "u2", inst.base, "0.2.0", alpha="2.0",
                        loras={"inkwash.safetensors": "lora_unet_a.lora_down.weight",
                               "pastel.safetensors": "lora_unet_b.lora_down.weight"})
    assert not (upd / "models" / "loras" / "inkwash.safetensors").exists()  # carried only what changed
    p = _sh(upd, inst.env)
    assert p.returncode == 0, p.stderr
    assert _version(inst.venv) == "darkroom, version 0.2.0" and _alpha(inst.venv) == "2.0"
    assert "(was Darkroom 0.1.0" in p.stderr
    assert inst.home_kept() and (inst.home / "models" / "loras" / "pastel.safetensors").is_file()
    assert len([p for p in inst.versions.iterdir() if (p / "pyvenv.cfg").is_file()]) == 2  # the old one is kept

    back = _sh(inst.base, inst.env, "--rollback")  # any bundle's install.sh
    assert back.returncode == 0, back.stderr
    assert "rolled back" in back.stderr and inst.state()[:2] == before[:2]
    assert _version(inst.venv) == "darkroom, version 0.1.0" and _alpha(inst.venv) == "1.0" and inst.home_kept()
    # again: forward, with the copy of the script kept beside the versions (no USB drive needed)
    forward = subprocess.run([BASE_PYTHON, str(inst.versions / "bundle_update.py"), "rollback", str(inst.venv)],
                             capture_output=True, text=True, timeout=60)
    assert forward.returncode == 0, forward.stderr
    assert _version(inst.venv) == "darkroom, version 0.2.0"
    # the CLI's entry does the same
    assert update.rollback_install(inst.venv)["darkroom_version"] == "0.1.0"
    assert _version(inst.venv) == "darkroom, version 0.1.0"

    # an update of the update: built against the running version only
    u3 = update_bundle(tmp_path / "u3", upd, "0.3.0", alpha="2.0")
    p = _sh(u3, inst.env)
    assert p.returncode == 1 and "this update is for Darkroom 0.2.0" in p.stderr
    update.rollback_install(inst.venv)
    p = _sh(u3, inst.env)
    assert p.returncode == 0, p.stderr
    assert _version(inst.venv) == "darkroom, version 0.3.0" and _alpha(inst.venv) == "2.0" and inst.home_kept()
    assert sorted(p.name[:5] for p in inst.versions.iterdir() if (p / "pyvenv.cfg").is_file()) == ["0.2.0", "0.3.0"]
    # the unchanged wheel came from the installed version: a hard link, not a copy
    alphas = [(p / "bundle-wheels" / "alpha-2.0-py3-none-any.whl").stat().st_ino for p in inst.versions.glob("0.*")]
    assert len(alphas) == 2 and alphas[0] == alphas[1]


def test_a_corrupted_update_is_refused_before_anything_changes(installed, tmp_path):
    before = installed.state()
    upd = update_bundle(tmp_path / "u2", installed.base, "0.2.0", alpha="2.0")
    _flip_byte(upd / "wheels" / "alpha-2.0-py3-none-any.whl")
    p = _sh(upd, installed.env)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1].startswith("darkroom: refusing to install: 1 file(s) of the bundle")
    assert "wheels/alpha-2.0-py3-none-any.whl" in p.stderr
    assert installed.state() == before and installed.home_kept()


def test_a_damaged_installed_wheel_is_refused_before_anything_changes(installed, tmp_path):
    before = installed.state()
    upd = update_bundle(tmp_path / "u2", installed.base, "0.2.0")  # alpha 1.0 comes from the installed version
    [version] = [p for p in installed.versions.iterdir() if p.is_dir()]
    wheel = version / "bundle-wheels" / "alpha-1.0-py3-none-any.whl"
    saved = wheel.read_bytes()
    wheel.unlink()
    wheel.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))  # a new file: no hard-linked copy changes
    try:
        p = _sh(upd, installed.env)
    finally:
        wheel.write_bytes(saved)
    assert p.returncode == 1
    assert "1 wheel(s) of the installed version are missing or damaged: alpha-1.0-py3-none-any.whl" in p.stderr
    assert installed.state() == before


def test_a_failed_self_check_leaves_the_old_version_active(installed, tmp_path):
    before = installed.state()
    upd = update_bundle(tmp_path / "u2", installed.base, "0.2.0", broken=True,
                        loras={"pastel.safetensors": "lora_unet_b.lora_down.weight"})
    p = _sh(upd, installed.env)
    assert p.returncode == 1
    assert ("darkroom: error: the new version failed its self-check (a test generation: RuntimeError: this build"
            f" cannot generate); {installed.venv} still runs the version it ran before") in p.stderr
    assert installed.state() == before and installed.home_kept()  # the half-built version is gone
    assert not (installed.home / "models" / "loras" / "pastel.safetensors").exists()


def test_an_update_for_another_base_is_refused_naming_both_versions(installed, tmp_path):
    before = installed.state()
    other = full_bundle(tmp_path / "other", "0.0.9")
    upd = update_bundle(tmp_path / "u2", other, "0.2.0")
    p = _sh(upd, installed.env)
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("darkroom: refusing to update: this update is for Darkroom 0.0.9 (bundle ")
    assert f"but {installed.venv} has Darkroom 0.1.0 (bundle " in last and "--since" in last
    assert installed.state() == before

    nothing = _sh(upd, {**installed.env, "DARKROOM_VENV": str(tmp_path / "none")})
    assert nothing.returncode == 1 and "install the full bundle first" in nothing.stderr
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    plain = _sh(upd, {**installed.env, "DARKROOM_VENV": str(tmp_path / "plain")})
    assert plain.returncode == 1 and "installed before updates were possible" in plain.stderr
    assert not (tmp_path / "none").exists() and not (tmp_path / "none.versions").exists()


def test_rollback_with_nothing_to_return_to_is_one_line(installed, tmp_path):
    p = _sh(installed.base, installed.env, "--rollback")
    assert p.returncode == 1
    sha = hashlib.sha256((installed.base / "manifest.json").read_bytes()).hexdigest()
    assert p.stderr.strip() == (f"darkroom: cannot roll back: {installed.venv} keeps no previous version (it runs"
                                f" Darkroom 0.1.0 (bundle {sha[:12]}))")
    with pytest.raises(bundle.BundleError, match="not installed from a bundle by install.sh"):
        update.rollback_install()  # this test process runs from the checkout's venv


def test_a_damaged_update_section_is_refused_by_verify(tmp_path, installed):
    upd = update_bundle(tmp_path / "u2", installed.base, "0.2.0")
    manifest = json.loads((upd / "manifest.json").read_text())
    manifest["update"]["wheels"][0]["path"] = "../../etc/passwd"
    (upd / "manifest.json").write_text(json.dumps(manifest))
    r = _invoke(["verify", str(upd)])
    assert r.exit_code == 1 and "is damaged: update.wheels" in r.output
    p = _sh(upd, installed.env)
    assert p.returncode == 1 and "is damaged" in p.stderr
