"""`darkroom serve`: the web UI and the HTTP APIs (the server itself is darkroom.server)."""

from __future__ import annotations

import click

from darkroom.cli.group import Context, user_errors, vram_options


@click.command()
@click.option("--port", type=int, default=7860, show_default=True, help="TCP port (7860, as every SD web UI).")
@click.option("--listen", is_flag=True,
              help="Answer on all network interfaces (0.0.0.0), e.g. for a phone on your LAN. Off by default so"
                   " that nothing beyond this machine can reach the server; when on, an access token is required.")
@click.option("--host", default=None, help="Bind this address instead (implies the token rules of --listen"
                                           " unless it is a loopback address).")
@click.option("--token", default=None, envvar="DARKROOM_TOKEN",
              help="Access token for the UI and all APIs (generated and printed when --listen is on and none given).")
@click.option("--api-auth", default=None, metavar="USER:PASS",
              help="Also accept HTTP Basic credentials, as the webui's --api-auth (A1111 clients send these).")
@click.option("--max-queue", type=int, default=100, show_default=True, help="Waiting jobs before 'queue full'.")
@click.option("--device", default=None, help="auto (default), cpu, cuda, cuda:N, mps.")
@click.option("--precision", default=None, help="auto (default), fp32, fp16, bf16.")
@vram_options
@click.option("--allow-pickle", is_flag=True, help="Allow .ckpt pickles (loaded with torch.load(weights_only=True)).")
@click.pass_obj
@user_errors
def serve(obj: Context, port, listen, host, token, api_auth, max_queue, device, precision, allow_pickle, vram,
          fp8) -> None:
    """Start the web UI and the HTTP APIs (A1111 /sdapi/v1, OpenAI /v1) on http://127.0.0.1:7860."""
    from darkroom.server.run import serve as run_server

    run_server(obj.home, port=port, listen=listen, host=host, token=token, api_auth=api_auth, max_queue=max_queue,
               device=device, precision=precision, allow_pickle=allow_pickle, vram=vram, fp8=fp8,
               echo=click.echo)

