"""Ansible plugins: installed playbooks run against tracked containers and groups."""
