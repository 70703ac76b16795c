# Install Darkroom from this offline bundle (made by `darkroom bundle create`). Never uses the network.
#
#   powershell -ExecutionPolicy Bypass -File install.ps1 [-Venv DIR] [-Force]   install, or apply an update
#   powershell -ExecutionPolicy Bypass -File install.ps1 -Rollback [-Venv DIR]  back to the version before
#
# The same steps as install.sh (see there): verify, a fresh venv in DIR.versions\ (default $HOME\darkroom-venv,
# or $env:DARKROOM_VENV), `pip --no-index` (torch first), a self-check, the models into the Darkroom home
# ($env:DARKROOM_HOME, else the per-user data folder), then DIR (a junction) is switched to the new venv.
# Not run on Windows by the tests (no PowerShell there): the steps are bundle_update.py's, which are.
#
# $env:PYTHON picks the interpreter (default: the py launcher for the bundle's Python version, else python).
# $env:DARKROOM_BUNDLE_VERIFY_ONLY = "1" stops after step 1.
param(
    [string]$Venv = $(if ($env:DARKROOM_VENV) { $env:DARKROOM_VENV } else { Join-Path $HOME "darkroom-venv" }),
    [switch]$Force,
    [switch]$Rollback
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

if ($Rollback) {
    & $Py @PyArgs (Join-Path $Here "bundle_update.py") rollback $Venv
    exit $LASTEXITCODE
}

# 1. the bundle is complete and intact, and this Python is the one it was made for
& $Py @PyArgs (Join-Path $Here "bundle_check.py") verify $Here
if ($LASTEXITCODE -ne 0) { exit 1 }
if ($env:DARKROOM_BUNDLE_VERIFY_ONLY -eq "1") { exit 0 }

# 2. where the new version goes: $Venv is a junction to $Venv.versions\<version>; an update needs its base there
$Update = Join-Path $Here "bundle_update.py"
$ForceArg = @(); if ($Force) { $ForceArg = @("--force") }
$New = & $Py @PyArgs $Update prepare $Here $Venv @ForceArg
if ($LASTEXITCODE -ne 0) { exit 1 }
if (-not $New) { exit 0 }  # this bundle is installed there already
try {
    Write-Host "darkroom: creating the venv $New"
    & $Py @PyArgs -m venv $New
    if ($LASTEXITCODE -ne 0) { Fail "error: '$Py -m venv' failed" }
    $VPy = Join-Path $New "Scripts\python.exe"

    # 3. the wheels, from this folder (and, for an update, the installed version's): no index, no pip.ini, no PIP_*
    function Pip-Offline {
        $env:PIP_CONFIG_FILE = "nul"
        & $VPy -m pip --isolated --disable-pip-version-check --no-input install --no-index `
            --find-links (Join-Path $New "bundle-wheels") --no-cache-dir @args
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

    # 4. the self-check (darkroom --version, a tiny generation in a scratch home), then the models
    & $Py @PyArgs $Update self-check $Here $Venv $New
    if ($LASTEXITCODE -ne 0) { exit 1 }
    & $VPy (Join-Path $Here "bundle_check.py") install-models $Here
    if ($LASTEXITCODE -ne 0) { exit 1 }

    # 5. the switch: $Venv now runs the new version; the one before stays for -Rollback
    & $Py @PyArgs $Update commit $Here $Venv $New
    if ($LASTEXITCODE -ne 0) { exit 1 }
} finally {
    & $Py @PyArgs $Update discard $Venv $New  # removes a half-built version; never the active one
}

$Exe = Join-Path $Venv "Scripts\darkroom.exe"
Write-Host ""
Write-Host "Darkroom is installed in $Venv. Try:"
Write-Host "  & `"$Exe`" generate `"a red circle on a white background`""
Write-Host "  & `"$Exe`" serve        # web UI on http://127.0.0.1:7860"
Write-Host "(add $Venv\Scripts to your PATH to type just 'darkroom')"
