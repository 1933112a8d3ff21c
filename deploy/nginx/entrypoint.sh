#!/bin/sh
# Writes nginx.conf for the upstreams in TEXTGEN_UPSTREAMS (comma-separated host:port; a name that
# resolves to several replicas counts for all of them), then runs nginx in the foreground.
set -eu
servers=""
for upstream in $(echo "${TEXTGEN_UPSTREAMS:-api:8000}" | tr ',' ' '); do
    servers="${servers}        server ${upstream} max_fails=2 fail_timeout=5s;
"
done
cat > /etc/nginx/nginx.conf <<CONF
worker_processes auto;
pid /run/nginx.pid;
error_log /dev/stderr warn;
events { worker_connections 4096; }
http {
    access_log /dev/stdout;
    upstream textgen {
        least_conn;
${servers}        keepalive 64;
    }
    server {
        listen ${LB_PORT:-8000};
        client_max_body_size 4m;
        location = /lb-health { return 200 "ok\n"; }
        location / {
            proxy_pass http://textgen;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            # token streams (SSE) go out as they come
            proxy_buffering off;
            proxy_read_timeout 600s;
            # a replica that is down or draining (503) has not run the request: try the next one
            proxy_next_upstream error timeout http_503 non_idempotent;
            add_header X-Upstream \$upstream_addr always;
        }
    }
}
CONF
exec nginx -g 'daemon off;'
