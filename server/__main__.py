"""`python -m server` runs the service (WEB_CONCURRENCY processes: one here, more under gunicorn);
`python -m server migrate [DATABASE_URL]` applies the SQL migrations."""

from __future__ import annotations

import logging
import sys

from core.errors import ConfigError
from core.logs import setup_logging
from core.settings import load_settings

from . import serve
from .app import create_app, tune_gc


def main(argv: list[str]) -> int:
    if argv[:1] == ["migrate"]:
        from core.store.migrate import main as migrate

        return migrate(argv[1:])
    if argv:
        print("usage: python -m server [migrate [DATABASE_URL]]", file=sys.stderr)
        return 2
    settings = load_settings()
    setup_logging(level=settings.log_level, fmt=settings.log_format)
    try:
        processes, uvloop = serve.process_count(settings), serve.uses_uvloop(settings)
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    url = f"http://{settings.host}:{settings.port}/"
    fields = {"url": url, "processes": processes, "event_loop": "uvloop" if uvloop else "asyncio"}
    logging.getLogger("server").info("listening", extra={"fields": fields})
    if processes > 1:
        from .processes import run  # gunicorn: needed only with several processes

        run(settings, processes=processes)
        return 0
    app = create_app(settings)
    app.on_startup.append(tune_gc)
    serve.run(app, host=settings.host, port=settings.port)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
