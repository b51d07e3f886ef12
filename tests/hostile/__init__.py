"""Tests with an attacker: a peer that signs whatever it likes, floods and sends garbage."""
