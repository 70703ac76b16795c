"""The offline story: the network guard every entry point installs (`guard`, imports nothing of
Darkroom's), the readiness checks `darkroom doctor` prints (`readiness`), and the proof run that
generates and serves inside a network namespace and audits what it touched (`proof`, which drives
the server and so sits with the interfaces)."""
