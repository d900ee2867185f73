"""nginx configs: the shared upstream server and the nginx proxy that canary-proxy is compared with."""

from __future__ import annotations

from pathlib import Path

from loadtests.topology import CANARY_BODY, CANARY_HEADER, STABLE_BODY, USER_HEADER, Files, Ports

# Settings both nginx instances need to run from their own prefix dir. The file limit is whatever the
# harness managed to raise RLIMIT_NOFILE to (a container may cap the hard limit).
_COMMON = """\
worker_processes {workers};
worker_rlimit_nofile {nofile};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections {nofile}; multi_accept on; }}
"""

_HTTP_COMMON = """\
    access_log off;
    default_type text/plain;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_max_body_size 0;
"""


def _prepare(prefix: Path) -> None:
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)


def command(prefix: Path, conf: Path) -> list[str]:
    """Run nginx in the foreground (so it is our child and stops with its process group)."""
    return ["nginx", "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"]


def write_upstream(prefix: Path, ports: Ports, files: Files, nofile: int) -> Path:
    """One nginx, one worker, serving identical fixed bodies as "stable" and "canary".

    /upload is relayed unbuffered to the Python sink, which answers only after the whole body
    arrived (nginx's own ``return`` would answer before reading the body).
    """
    _prepare(prefix)

    def server(port: int, body: str) -> str:
        return f"""\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /small {{ return 200 "{body.strip()}\\n"; }}
        location = /64k {{ alias {files.www}/64k.bin; }}
        location = /download {{ alias {files.blob}; }}
        location = /upload {{
            proxy_pass http://sink;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_buffering off;
        }}
    }}
"""

    conf = prefix / "nginx.conf"
    conf.write_text(
        _COMMON.format(workers=1, prefix=prefix, nofile=nofile)
        + "http {\n"
        + _HTTP_COMMON.format(prefix=prefix)
        + "    sendfile on;\n    tcp_nopush on;\n"
        + f"    upstream sink {{ server 127.0.0.1:{ports.sink}; keepalive 8; }}\n"
        + server(ports.stable, STABLE_BODY)
        + server(ports.canary, CANARY_BODY)
        + "}\n"
    )
    return conf


def write_proxy(
    prefix: Path, port: int, ports: Ports, workers: int, nofile: int, tls: tuple[Path, Path] | None = None
) -> Path:
    """The nginx reverse proxy with canary-proxy's routing: header rule, then sticky 90/10 split.

    split_clients hashes ``$http_x_user_id`` (MurmurHash2) into the 10 % / 90 % buckets, and a map on
    ``$http_x_canary`` overrides it, like the ``beta`` route. Upstream connections are kept alive.
    Small and 64 KiB responses use nginx's default (in-memory) response buffering; /upload and
    /download stream unbuffered in both directions, as canary-proxy does. ``tls`` (cert, key): the
    listener terminates TLS 1.2+ with that pair (session cache and tickets on, nginx's defaults).
    """
    listen = f"listen 127.0.0.1:{port} backlog=4096;"
    if tls is not None:
        listen = (
            f"listen 127.0.0.1:{port} ssl backlog=4096;\n        ssl_certificate {tls[0]};\n"
            f"        ssl_certificate_key {tls[1]};\n        ssl_protocols TLSv1.2 TLSv1.3;\n"
            "        ssl_session_cache shared:SSL:10m;"
        )
    _prepare(prefix)
    user_var = "$http_" + USER_HEADER.replace("-", "_")
    canary_var = "$http_" + CANARY_HEADER.replace("-", "_")
    stream = """\
            proxy_pass http://$pool;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_buffer_size 64k;
            proxy_buffers 4 64k;
            proxy_busy_buffers_size 128k;
            client_body_buffer_size 64k;
"""
    conf = prefix / "nginx.conf"
    conf.write_text(
        _COMMON.format(workers=workers, prefix=prefix, nofile=nofile)
        + "http {\n"
        + _HTTP_COMMON.format(prefix=prefix)
        + f"""\
    upstream stable {{ server 127.0.0.1:{ports.stable}; keepalive 64; keepalive_requests 10000000; }}
    upstream canary {{ server 127.0.0.1:{ports.canary}; keepalive 64; keepalive_requests 10000000; }}
    split_clients "{user_var}" $split {{ 10% canary; * stable; }}
    map {canary_var} $pool {{ always canary; default $split; }}
    server {{
        {listen}
        location / {{
            proxy_pass http://$pool;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # Big enough that a 64 KiB response is read in one go, never spilled to disk.
            proxy_buffer_size 16k;
            proxy_buffers 8 16k;
            proxy_max_temp_file_size 0;
        }}
        location = /upload {{
{stream}        }}
        location = /download {{
{stream}        }}
    }}
}}
"""
    )
    return conf
