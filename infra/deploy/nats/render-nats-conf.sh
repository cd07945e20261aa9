#!/bin/sh
# Renders quiver-nats.conf.template for one node from its env file:
#   render-nats-conf.sh /etc/quiver/nats/node.env > /etc/quiver/nats/quiver-nats.conf
set -eu
if [ $# -ne 1 ]; then
  echo "usage: $0 NODE_ENV_FILE > quiver-nats.conf   (see node.env)" >&2
  exit 2
fi
. "$1"
for name in NATS_NODE_NAME NATS_CLIENT_LISTEN NATS_CLUSTER_LISTEN NATS_ROUTES NATS_STORE_DIR NATS_TLS_DIR NATS_USER_NKEY; do
  eval "value=\${$name:-}"
  if [ -z "$value" ]; then
    echo "$0: $name is not set in $1 (see node.env)" >&2
    exit 2
  fi
done
case "$NATS_USER_NKEY" in
  U*) ;;
  *) echo "$0: NATS_USER_NKEY must be the user's public nkey (U...), never its seed (SU...)" >&2; exit 2 ;;
esac
# "nats-route://a:6222,nats-route://b:6222" -> "nats-route://a:6222", "nats-route://b:6222"
routes="\"$(printf '%s' "$NATS_ROUTES" | tr -d ' ' | sed 's/,/", "/g')\""
sed \
  -e "s|@NODE_NAME@|$NATS_NODE_NAME|g" \
  -e "s|@CLIENT_LISTEN@|$NATS_CLIENT_LISTEN|g" \
  -e "s|@CLUSTER_LISTEN@|$NATS_CLUSTER_LISTEN|g" \
  -e "s|@MONITOR_LISTEN@|${NATS_MONITOR_LISTEN:-127.0.0.1:8222}|g" \
  -e "s|@ROUTES@|$routes|g" \
  -e "s|@STORE_DIR@|$NATS_STORE_DIR|g" \
  -e "s|@TLS_DIR@|$NATS_TLS_DIR|g" \
  -e "s|@USER_NKEY@|$NATS_USER_NKEY|g" \
  "$(dirname "$0")/quiver-nats.conf.template"
