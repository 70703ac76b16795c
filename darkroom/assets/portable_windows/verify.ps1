# Checks every file of this portable Darkroom against manifest.json (size and SHA-256) before first use.
# Needs only Windows PowerShell 5.1 or newer; reads nothing from the network.
#
#   powershell -ExecutionPolicy Bypass -File verify.ps1
#
# Exit 0: every file listed in the manifest is present and intact. Exit 1: the bad files are named;
# copy the folder again from the drive it came on.
$ErrorActionPreference = 'Stop'
$root = $PSScriptRoot
$manifestPath = Join-Path $root 'manifest.json'
if (-not (Test-Path -LiteralPath $manifestPath -PathType Leaf)) {
    Write-Host "darkroom: $manifestPath is missing: this is not a whole portable Darkroom folder"
    exit 1
}
$manifest = Get-Content -LiteralPath $manifestPath -Raw -Encoding UTF8 | ConvertFrom-Json
$bad = New-Object System.Collections.Generic.List[string]
$total = @($manifest.files).Count
$done = 0
foreach ($entry in $manifest.files) {
    $done++
    if ($done % 200 -eq 0) {
        Write-Progress -Activity 'Checking Darkroom' -Status "$done of $total files" -PercentComplete (100 * $done / $total)
    }
    $path = Join-Path $root ($entry.path -replace '/', '\')
    if (-not (Test-Path -LiteralPath $path -PathType Leaf)) {
        $bad.Add("$($entry.path): missing")
        continue
    }
    $item = Get-Item -LiteralPath $path
    if ($item.Length -ne [int64]$entry.size) {
        $bad.Add("$($entry.path): $($item.Length) bytes, expected $($entry.size)")
        continue
    }
    $hash = (Get-FileHash -LiteralPath $path -Algorithm SHA256).Hash.ToLowerInvariant()
    if ($hash -ne $entry.sha256) {
        $bad.Add("$($entry.path): SHA-256 differs (damaged copy)")
    }
}
Write-Progress -Activity 'Checking Darkroom' -Completed
if ($bad.Count -gt 0) {
    foreach ($line in $bad) { Write-Host "  $line" }
    Write-Host "darkroom: $($bad.Count) bad file(s): copy the folder again before running darkroom.cmd"
    exit 1
}
Write-Host "OK: $total files match manifest.json (darkroom $($manifest.darkroom_version)). Run darkroom.cmd next."
exit 0
