"""Who may do what on the page: admins load and unload variants and run jobs; viewers prompt,
compare, route and vote. Without logins the app listens on this machine only (settings), and its
one user is the admin."""

from __future__ import annotations

import threading

import gradio as gr

from playground.settings import Role, Settings


class Access:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._roles: dict[str, Role] = {}  # name -> the role of its last successful login
        self._lock = threading.Lock()

    def login(self, name: str, password: str) -> bool:
        """Gradio's login check; remembers the role the login gave."""
        role = self.settings.role_of(name, password)
        if role is not None:
            with self._lock:
                self._roles[name] = role
        return role is not None

    def role(self, request: gr.Request | None) -> Role:
        if not self.settings.auth_enabled:
            return "admin"
        name = getattr(request, "username", None)
        with self._lock:
            return self._roles.get(name, "viewer") if name else "viewer"

    def refusal(self, request: gr.Request | None, action: str) -> str | None:
        """A message when this session may not do `action`, else None."""
        if self.role(request) == "admin":
            return None
        return f"⚠ Only an admin can {action}; you are signed in as a viewer."

    def banner(self, request: gr.Request) -> str:
        if not self.settings.auth_enabled:
            return ""
        name = getattr(request, "username", None) or "?"
        return f"Signed in as **{name}** ({self.role(request)})"
