# Install Darkroom from this offline bundle (made by `darkroom bundle create`). Never uses the network.
#
#   powershell -ExecutionPolicy Bypass -File install.ps1 [-Venv DIR] [-Force]
#
# 1. checks every file of the bundle against manifest.json (SHA-256) and that this Python fits the bundle;
#    refuses, naming the files, if anything is missing or corrupted;
# 2. makes a fresh venv (default $HOME\darkroom-venv, or $env:DARKROOM_VENV);
# 3. installs the bundled wheels into it with `pip --no-index` (torch first), ignoring any pip configuration;
# 4. copies the bundled models into the Darkroom home ($env:DARKROOM_HOME, else the per-user data folder).
#
# $env:PYTHON picks the interpreter (default: the py launcher for the bundle's Python version, else python).
# $env:DARKROOM_BUNDLE_VERIFY_ONLY = "1" stops after step 1.
param(
    [string]$Venv = $(if ($env:DARKROOM_VENV) { $env:DARKROOM_VENV } else { Join-Path $HOME "darkroom-venv" }),
    [switch]$Force
)
$ErrorActionPreference = "Stop"
$Here = Split-Path -Parent $MyInvocation.MyCommand.Path

function Fail([string]$Message) {
    Write-Host "darkroom: $Message" -ForegroundColor Red
    exit 1
}

# The interpreter: $env:PYTHON, else `py -X.Y` for the bundle's Python, else python.
$PyArgs = @()
if ($env:PYTHON) {
    $Py = $env:PYTHON
} else {
    $Want = $null
    try { $Want = (Get-Content -Raw -Path (Join-Path $Here "manifest.json") | ConvertFrom-Json).target.python } catch { }
    if ((Get-Command py -ErrorAction SilentlyContinue) -and $Want) {
        $Py = "py"; $PyArgs = @("-$Want")
    } elseif (Get-Command python -ErrorAction SilentlyContinue) {
        $Py = "python"
    } else {
        Fail "refusing to install: no Python found (install Python $Want, or set `$env:PYTHON)"
    }
}

# 1. the bundle is complete and intact, and this Python is the one it was made for
& $Py @PyArgs (Join-Path $Here "bundle_check.py") verify $Here
if ($LASTEXITCODE -ne 0) { exit 1 }
if ($env:DARKROOM_BUNDLE_VERIFY_ONLY -eq "1") { exit 0 }

# 2. a fresh venv
if ((Test-Path $Venv) -and (Get-ChildItem -Force $Venv | Select-Object -First 1)) {
    if (-not $Force) {
        Fail "refusing to install: $Venv already exists (use -Venv DIR for another folder, or -Force to replace it)"
    }
    Remove-Item -Recurse -Force $Venv
}
Write-Host "darkroom: creating the venv $Venv"
& $Py @PyArgs -m venv $Venv
if ($LASTEXITCODE -ne 0) { Fail "error: '$Py -m venv' failed" }
$Venv = (Resolve-Path $Venv).Path
$VPy = Join-Path $Venv "Scripts\python.exe"

# 3. the wheels, from this folder only: no index, no pip.ini, no PIP_* variables
function Pip-Offline {
    $env:PIP_CONFIG_FILE = "nul"
    & $VPy -m pip --isolated --disable-pip-version-check --no-input install --no-index `
        --find-links (Join-Path $Here "wheels") --no-cache-dir @args
    $code = $LASTEXITCODE
    Remove-Item Env:PIP_CONFIG_FILE
    if ($code -ne 0) { Fail "error: pip install failed (see above)" }
}
Write-Host "darkroom: installing torch"
Pip-Offline "-r" (Join-Path $Here "requirements-torch.txt")
Write-Host "darkroom: installing Darkroom and its dependencies"
Pip-Offline "-r" (Join-Path $Here "requirements.txt")
if (Test-Path (Join-Path $Here "requirements-nodeps.txt")) {  # declared dependencies must not be installed
    Pip-Offline "--no-deps" "-r" (Join-Path $Here "requirements-nodeps.txt")
}

# 4. the models
& $VPy (Join-Path $Here "bundle_check.py") install-models $Here
if ($LASTEXITCODE -ne 0) { exit 1 }

$Exe = Join-Path $Venv "Scripts\darkroom.exe"
Write-Host ""
Write-Host "Darkroom is installed in $Venv. Try:"
Write-Host "  & `"$Exe`" generate `"a red circle on a white background`""
Write-Host "  & `"$Exe`" serve        # web UI on http://127.0.0.1:7860"
Write-Host "(add $Venv\Scripts to your PATH to type just 'darkroom')"
