"""Typed application state shared by the handlers (aiohttp AppKeys)."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from sidecar.service import AdmissionService

SERVICE = web.AppKey("service", AdmissionService)
UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)
