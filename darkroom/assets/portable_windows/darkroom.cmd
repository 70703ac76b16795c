@echo off
rem Darkroom, portable for Windows (made by `darkroom bundle create --portable --platform win_amd64`).
rem Runs the embeddable Python in python\ with Darkroom and its dependencies; nothing is installed.
rem
rem   darkroom.cmd generate "a red circle on a white background"
rem   darkroom.cmd serve            (web UI on http://127.0.0.1:7860)
rem
rem Settings, history and outputs go to the "home" folder beside this file, so they travel with the
rem folder; set DARKROOM_HOME first to keep them elsewhere. Models carried in models\ are used in place.
rem No parenthesised blocks below: a ")" in the folder's path (C:\Program Files (x86)\...) would end one.
setlocal
set "ROOT=%~dp0"
set "ROOT=%ROOT:~0,-1%"
if not exist "%ROOT%\python\python.exe" goto nopython
@REDIST_CHECK@
if not defined DARKROOM_HOME set "DARKROOM_HOME=%ROOT%\home"
set "PYTHONUTF8=1"
set MODELS=
if exist "%ROOT%\models\checkpoints\" set MODELS=--models-dir "%ROOT%"
"%ROOT%\python\python.exe" -m darkroom.cli %MODELS% %*
exit /b %ERRORLEVEL%

:nopython
echo darkroom: "%ROOT%\python\python.exe" is missing: copy the whole folder, then run verify.ps1 1>&2
exit /b 1

:noredist
echo darkroom: @REDIST_DLLS@ not found in System32: install the Microsoft Visual C++ 2015-2022 Redistributable x64 first 1>&2
echo darkroom: vc_redist.x64.exe from https://aka.ms/vs/17/release/vc_redist.x64.exe - carry it on the drive 1>&2
exit /b 1
