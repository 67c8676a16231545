"""`emu dashboard`: serve the web dashboard; `hash-password` and `new-token` make credentials.

A Typer sub-app registered by emu/cli.py; importing it imports only typer (FastAPI and uvicorn
load when the server starts).
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

__all__ = ["dashboard_app"]

dashboard_app = typer.Typer(help="The web dashboard: runs, curves, samples, lineage, retraining, schedules, audit log.",
                            invoke_without_command=True)


@dashboard_app.callback()
def serve(
    context: typer.Context,
    host: Annotated[Optional[str], typer.Option(help="Address to listen on (default: the preset's, 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="TCP port (default: the preset's, 8000).")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", "--config",
                                                  help="Preset whose `dashboard` section to use.")] = None,
    settings: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Dashboard setting key=value (e.g. backend=kfp, read_access=login); repeat for several.")] = None,
) -> None:
    """Serve the dashboard. Users and tokens come from EMU_DASHBOARD_USERS / EMU_DASHBOARD_TOKENS
    (or the preset); without any, pages are read-only. Runs it starts use this environment's
    EMU_HOME / EMU_LINEAGE_URL / EMU_DVC_REMOTE."""
    if context.invoked_subcommand is not None:
        return
    import dataclasses

    import uvicorn

    from emu.dashboard.app import create_app
    from emu.dashboard.config import load_config, with_environment

    config = with_environment(load_config(preset, list(settings or [])))
    config = dataclasses.replace(config, host=host or config.host, port=port or config.port)
    app = create_app(config)
    if not (config.users or config.tokens):
        typer.echo("no dashboard users configured: read-only (see `emu dashboard hash-password --help`)", err=True)
    typer.echo(f"Emu dashboard on http://{config.host}:{config.port} (backend {config.backend})", err=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", proxy_headers=False)


@dashboard_app.command("hash-password")
def hash_password_command(
    stdin: Annotated[bool, typer.Option("--stdin", help="Read the password from standard input (first line).")] = False,
) -> None:
    """Print the PBKDF2 hash of a password, for EMU_DASHBOARD_USERS="name:<hash>" or the preset's
    dashboard.users. Prompts (hidden) unless --stdin."""
    from emu.dashboard.auth import hash_password

    if stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    typer.echo(hash_password(password))


@dashboard_app.command("new-token")
def new_token_command(user: Annotated[str, typer.Argument(help="User name the token acts as (in the audit log).")]) -> None:
    """Make an API token for `user`: prints the token (give it to the client, shown once) and the
    entry for EMU_DASHBOARD_TOKENS (its sha256, which is all the dashboard keeps)."""
    from emu.dashboard.auth import new_token, token_digest

    token = new_token()
    typer.echo(f"token: {token}")
    typer.echo(f"EMU_DASHBOARD_TOKENS entry: {token_digest(token)}:{user}")
