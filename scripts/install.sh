#!/usr/bin/env bash
# Builds and installs sanvol's binaries, man pages, shell completions and
# systemd units (the steps docs/operations.md describes). Needs root (or
# sudo) for the default PREFIX.
#   PREFIX=/usr/local  where bin/ and share/ go
#   SYSTEMD_DIR=/etc/systemd/system  where the units go ("" to skip)
#   DESTDIR=  staging root for packagers
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=${PREFIX:-/usr/local}
SYSTEMD_DIR=${SYSTEMD_DIR-/etc/systemd/system}
DESTDIR=${DESTDIR:-}
binaries=(sanvol sanvol-mds sanvol-agent sanvol-backup sanvol-target)

cargo build --release --locked -p metadata-server -p client-agent -p backup -p target-server
install -d "$DESTDIR$PREFIX/bin" "$DESTDIR$PREFIX/share/man/man1" \
    "$DESTDIR$PREFIX/share/bash-completion/completions" "$DESTDIR$PREFIX/share/zsh/site-functions" \
    "$DESTDIR$PREFIX/share/fish/vendor_completions.d"
for b in "${binaries[@]}"; do
    install -m 0755 "target/release/$b" "$DESTDIR$PREFIX/bin/$b"
    # Man pages and completions come from each binary's own clap definition.
    "target/release/$b" generate man "$DESTDIR$PREFIX/share/man/man1" >/dev/null
    "target/release/$b" generate completions bash >"$DESTDIR$PREFIX/share/bash-completion/completions/$b"
    "target/release/$b" generate completions zsh >"$DESTDIR$PREFIX/share/zsh/site-functions/_$b"
    "target/release/$b" generate completions fish >"$DESTDIR$PREFIX/share/fish/vendor_completions.d/$b.fish"
done
if [ -n "$SYSTEMD_DIR" ]; then
    install -d "$DESTDIR$SYSTEMD_DIR"
    for unit in contrib/systemd/*.service contrib/systemd/*.timer; do
        sed "s|/usr/local/bin/|$PREFIX/bin/|g" "$unit" >"$DESTDIR$SYSTEMD_DIR/$(basename "$unit")"
    done
    echo "units installed in $DESTDIR$SYSTEMD_DIR; run: systemctl daemon-reload"
fi
echo "installed ${binaries[*]} into $DESTDIR$PREFIX/bin, man pages and bash/zsh/fish completions under $DESTDIR$PREFIX/share"
