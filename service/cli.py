"""`monosemantic-serve`: start the service (HTTP and gRPC in one process) on a model and its dictionaries."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError

from monosemantic.errors import MonosemanticError, describe_validation_error
from service.settings import ServiceSettings

# service.server (torch, transformers: ~9 s of imports on a 2-core machine) is imported only once the settings
# and the TLS pair are known good, so --help and a bad setting answer at once.

def _settings_table() -> str:
    """Every setting with its environment variable and default, from ServiceSettings itself (so --help cannot
    drift from what the service reads)."""
    rows = []
    for name, field in ServiceSettings.model_fields.items():
        default = field.default_factory() if field.default_factory is not None else field.default
        if isinstance(default, Path):
            default = "the shipped one" if name == "registry" else default
        shown = "(none)" if default is None else default
        rows.append(f"MONOSEMANTIC_{name.upper()} = {shown}")
    # "\b" keeps click from re-wrapping the table into one paragraph.
    return "Settings (a flag above wins over its environment variable):\n\n\b\n" + "\n".join(rows)


app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None)


@app.command(epilog=_settings_table())
def serve(
    host: Optional[str] = typer.Option(None, help="bind address [env MONOSEMANTIC_HOST, default 127.0.0.1]"),
    http_port: Optional[int] = typer.Option(None, help="HTTP port [env MONOSEMANTIC_HTTP_PORT, default 8000]"),
    grpc_port: Optional[int] = typer.Option(None, help="gRPC port [env MONOSEMANTIC_GRPC_PORT, default 50051]"),
    registry: Optional[Path] = typer.Option(None, help="dictionary registry [env MONOSEMANTIC_REGISTRY, default: the shipped one]"),
    dictionary: Optional[list[str]] = typer.Option(None, help="NAME[:VERSION], repeated for several (the first is the default; "
                                                   "'all': every dictionary of the registry bound to the model) [env MONOSEMANTIC_DICTIONARIES=A,B:3 or "
                                                   "MONOSEMANTIC_DICTIONARY, default reference]"),
    model: Optional[str] = typer.Option(None, help="HF model directory or hub id [env MONOSEMANTIC_MODEL, default: the model the dictionary's manifest records, else the shipped reference LM]"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda [env MONOSEMANTIC_DEVICE, default cpu]"),
    dtype: Optional[str] = typer.Option(None, help="auto | bfloat16 | float32: the model's dtype (auto: the checkpoint's) [env MONOSEMANTIC_DTYPE, default auto]"),
    log_level: Optional[str] = typer.Option(None, help="debug | info | warning | error [env MONOSEMANTIC_LOG_LEVEL, default info]"),
    chat_template: Optional[Path] = typer.Option(None, help="a Jinja chat template for /openai/v1/chat/completions when the tokenizer has none "
                                                           "[env MONOSEMANTIC_CHAT_TEMPLATE]"),
) -> None:
    """Serve activations, attributions and steered generation over REST (/v1, /docs) and gRPC."""
    flags = {k: v for k, v in dict(host=host, http_port=http_port, grpc_port=grpc_port, registry=registry, model=model, device=device, log_level=log_level,
                                   chat_template=chat_template, dtype=dtype).items() if v is not None}
    if dictionary:  # the flags win over both environment variables
        flags.update(dictionaries=list(dictionary), dictionary=dictionary[0])
    try:
        settings = ServiceSettings(**flags)
    except ValidationError as exc:
        typer.echo(f"error: {describe_validation_error(exc, 'settings')}", err=True)
        raise typer.Exit(2)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings.tls_pair()
        settings.chat_template_text()
        from service.server import Server

        asyncio.run(Server(settings).serve())
    except MonosemanticError as exc:
        typer.echo(f"error: cannot start: {exc}", err=True)
        raise typer.Exit(1)
    except OSError as exc:
        typer.echo(f"error: cannot start: {exc.strerror or exc}", err=True)
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
