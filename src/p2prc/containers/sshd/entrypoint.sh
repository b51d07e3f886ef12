#!/bin/sh
# Install the keys the node passed in P2PRC_AUTHORIZED_KEYS (one OpenSSH public key per
# line, already validated and re-serialised by the node), give this container its own
# host key, and run sshd in the foreground. Nothing here is evaluated as shell code.
# The keys go to a root-owned file sshd reads (sshd_config), so this runs with the few
# capabilities the node leaves the container (no DAC_OVERRIDE needed into the home).
set -eu
keys_dir=/etc/ssh/p2prc_authorized_keys
mkdir -p "$keys_dir"
umask 022
printf '%s\n' "${P2PRC_AUTHORIZED_KEYS:-}" > "$keys_dir/p2prc"
unset P2PRC_AUTHORIZED_KEYS
if [ ! -f /etc/ssh/ssh_host_ed25519_key ]; then
    ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
fi
mkdir -p /run/sshd
exec /usr/sbin/sshd -D -e
