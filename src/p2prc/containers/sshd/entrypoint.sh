#!/bin/sh
# Install the keys the node passed in P2PRC_AUTHORIZED_KEYS (one OpenSSH public key per
# line, already validated and re-serialised by the node), give this container its own
# host key, and run sshd in the foreground. Nothing here is evaluated as shell code.
set -eu
ssh_dir=/home/p2prc/.ssh
mkdir -p "$ssh_dir"
printf '%s\n' "${P2PRC_AUTHORIZED_KEYS:-}" > "$ssh_dir/authorized_keys"
unset P2PRC_AUTHORIZED_KEYS
chown -R p2prc:p2prc "$ssh_dir"
chmod 700 "$ssh_dir"
chmod 600 "$ssh_dir/authorized_keys"
if [ ! -f /etc/ssh/ssh_host_ed25519_key ]; then
    ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
fi
mkdir -p /run/sshd
exec /usr/sbin/sshd -D -e
