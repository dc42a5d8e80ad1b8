"""The organizer API's OpenAPI 3.1 document, published at ``GET /api/manage/openapi.json``, built from the
pydantic models that validate the bodies and describe the answers (``proxy.manage.models``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from proxy.manage.models import (
    Account,
    AccountKey,
    AccountList,
    AttendeeBlocked,
    AttendeeList,
    AttendeePatch,
    AuditList,
    CodeRotated,
    ErrorBody,
    EventCreate,
    EventCreated,
    EventDeleted,
    EventList,
    EventOut,
    EventUpdate,
    KeyReset,
    OrganizerCreate,
    RotateCode,
    Share,
    Shares,
    UsageReport,
)


def openapi() -> dict[str, Any]:
    """The organizer API's OpenAPI 3.1 document."""
    models: list[type[BaseModel]] = [
        EventCreate, EventUpdate, RotateCode, AttendeePatch, EventOut, EventCreated, EventList, CodeRotated,
        EventDeleted, UsageReport, AttendeeList, AttendeeBlocked, KeyReset, Share, OrganizerCreate, Account,
        AccountKey, AccountList, Shares, AuditList, ErrorBody,
    ]  # fmt: skip
    _, schemas = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    components = schemas["$defs"]

    def ref(name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}"}

    def answer(name: str, what: str, status: str = "200") -> dict[str, Any]:
        errors = {
            code: {"description": text, "content": {"application/json": {"schema": ref("ErrorBody")}}}
            for code, text in (("400", "invalid_request, param names the field"), ("401", "unauthorized"),
                               ("403", "forbidden: the account's role does not allow it"),
                               ("404", "not_found (also an event the account may not see)"),
                               ("503", "storage_unavailable or organizer_api_disabled"))
        }  # fmt: skip
        return {status: {"description": what, "content": {"application/json": {"schema": ref(name)}}}, **errors}

    def body(name: str, required: bool = True) -> dict[str, Any]:
        return {"required": required, "content": {"application/json": {"schema": ref(name)}}}

    event_id = {"name": "event_id", "in": "path", "required": True, "schema": {"type": "string"}}
    user = {"name": "user", "in": "path", "required": True, "schema": {"type": "string"}}
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    by = {"name": "by", "in": "query",
          "schema": {"enum": ["user", "model", "day", "backend", "hour"], "default": "user"}}  # fmt: skip
    attendees = {"name": "attendees", "in": "query", "schema": {"type": "integer", "minimum": 1}}
    quota = {"name": "tpm", "in": "query", "schema": {"type": "array", "items": {"type": "string"}},
             "description": "MODEL=TPM: a deployment's quota in tokens per minute; repeatable"}  # fmt: skip
    paths = {
        "/events": {
            "post": {"summary": "Create an event", "requestBody": body("EventCreate"),
                     "responses": answer("EventCreated", "the event, with its code shown once", "201")},
            "get": {"summary": "List events", "responses": answer("EventList", "every event")},
        },
        "/events/{event_id}": {
            "parameters": [event_id],
            "get": {"summary": "Show an event", "responses": answer("EventOut", "the event")},
            "patch": {"summary": "Change an event", "requestBody": body("EventUpdate"),
                      "responses": answer("EventOut", "the event changed")},
            "delete": {"summary": "Delete an event (its usage is kept)",
                       "responses": answer("EventDeleted", "deleted")},
        },
        "/events/{event_id}/rotate-code": {
            "parameters": [event_id],
            "post": {"summary": "Give the event a new code", "requestBody": body("RotateCode", required=False),
                     "responses": answer("CodeRotated", "the new code, shown once")},
        },
        "/events/{event_id}/usage": {
            "parameters": [event_id, by],
            "get": {"summary": "Usage (CSV with Accept: text/csv)", "responses": answer("UsageReport", "the report")},
        },
        "/events/{event_id}/plan": {
            "parameters": [event_id, attendees, quota],
            "get": {"summary": "Will the quota hold, and what can the event cost at most (proxy/manage/plan.py)",
                    "responses": {"200": {"description": "the plan, per model"}}},
        },
        "/events/{event_id}/attendees": {
            "parameters": [event_id],
            "get": {"summary": "Attendees seen", "responses": answer("AttendeeList", "the attendees")},
        },
        "/events/{event_id}/attendees/{user}": {
            "parameters": [event_id, user],
            "patch": {"summary": "Block or unblock a name", "requestBody": body("AttendeePatch"),
                      "responses": answer("AttendeeBlocked", "done; applies within EVENT_CACHE_SECONDS")},
        },
        "/events/{event_id}/attendees/{user}/reset-key": {
            "parameters": [event_id, user],
            "post": {"summary": "Reset a name's personal key: it stops working, the name can register again",
                     "responses": answer("KeyReset", "done; applies within EVENT_CACHE_SECONDS on other instances")},
        },
        "/events/{event_id}/share": {
            "parameters": [event_id],
            "post": {"summary": "Share the event with an account (at once)", "requestBody": body("Share"),
                     "responses": answer("Shares", "the owner and the shares")},
        },
        "/events/{event_id}/share/{name}": {
            "parameters": [event_id, name],
            "delete": {"summary": "Stop sharing the event with an account (at once)",
                       "responses": answer("Shares", "the owner and the shares")},
        },
        "/organizers": {
            "post": {"summary": "Add an organizer account (admins)", "requestBody": body("OrganizerCreate"),
                     "responses": answer("AccountKey", "the account, with its key shown once", "201")},
            "get": {"summary": "List the organizer accounts (admins)", "responses": answer("AccountList", "accounts")},
        },
        "/organizers/{name}": {
            "parameters": [name],
            "delete": {"summary": "Remove an account: its key stops working (admins)",
                       "responses": {"200": {"description": "removed"}}},
        },
        "/organizers/{name}/reset-key": {
            "parameters": [name],
            "post": {"summary": "A new key for an account, shown once; the old one stops working (admins)",
                     "responses": answer("AccountKey", "the new key, shown once")},
        },
        "/audit": {
            "parameters": [{"name": "event", "in": "query", "schema": {"type": "string"}}],
            "get": {"summary": "The audit log, newest first (of one event, or all the caller may see)",
                    "responses": answer("AuditList", "the entries")},
        },
    }  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {"title": "Event proxy: organizer API", "version": "1"},
        "servers": [{"url": "/api/manage"}],
        "security": [{"organizerKey": []}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "organizerKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "ORGANIZER_KEY, or an organizer account's key",
                }
            },
        },
    }
