#!/bin/sh
# Compile the MMS plugin (GET /ping, GET /execution-parameters) into one jar.
#   build.sh MODEL_SERVER_JAR OUT_JAR
# MODEL_SERVER_JAR: multi-model-server's frontend jar (site-packages/mms/frontend/model-server.jar),
# the plugin SDK and the classes /ping reads. Needs a JDK (javac, jar).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
classes=$(mktemp -d)
trap 'rm -rf "$classes"' EXIT
javac -nowarn --release 17 -cp "$1" -d "$classes" "$here"/src/kennel/mms/*.java
cp -R "$here/META-INF" "$classes/"
mkdir -p "$(dirname "$2")"
jar cf "$2" -C "$classes" .
