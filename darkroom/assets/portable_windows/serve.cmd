@echo off
rem Starts Darkroom's web UI (http://127.0.0.1:7860); double-click this file, or add serve options.
call "%~dp0darkroom.cmd" serve %*
