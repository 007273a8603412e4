"""Generated contract files: JSON Schemas, topic definitions and the AsyncAPI document.

``streamengine contract --write`` regenerates them from the code; ``--check`` (and a test) fails when
the committed files drift from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from streamengine.config.settings import KafkaSettings
from streamengine.contract.events import CANARY_TYPE, FEEDBACK_TYPE, RELEASED_TYPE, STATUS_TYPE, json_schemas
from streamengine.contract.topics import topic_specs

_CE_HEADERS = ["ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time", "content-type"]
_DLQ_HEADERS = ["error.class", "error.message", "source.topic", "source.partition", "source.offset"]


def _asyncapi(kafka: KafkaSettings) -> dict[str, object]:
    feedback, dlq, released, canary, status = topic_specs(kafka)

    def header_schema(names: list[str]) -> dict[str, object]:
        return {"type": "object", "properties": {n: {"type": "string"} for n in names}}

    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "streamengine",
            "version": "1.0.0",
            "description": "Feedback in, LoRA adapter releases out. Values are UTF-8 JSON; CloudEvents binary mode.",
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": "application/json",
        "channels": {
            "feedbackEvents": {
                "address": feedback.name,
                "description": feedback.purpose,
                "messages": {"FeedbackEvent": {"$ref": "#/components/messages/FeedbackEvent"}},
            },
            "feedbackDlq": {
                "address": dlq.name,
                "description": dlq.purpose,
                "messages": {"Rejected": {"$ref": "#/components/messages/Rejected"}},
            },
            "adapterReleased": {
                "address": released.name,
                "description": released.purpose,
                "messages": {"AdapterReleased": {"$ref": "#/components/messages/AdapterReleased"}},
            },
            "adapterCanary": {
                "address": canary.name,
                "description": canary.purpose,
                "messages": {"AdapterCanary": {"$ref": "#/components/messages/AdapterCanary"}},
            },
            "adapterStatus": {
                "address": status.name,
                "description": status.purpose,
                "messages": {"NodeStatus": {"$ref": "#/components/messages/NodeStatus"}},
            },
        },
        "operations": {
            "consumeFeedback": {"action": "receive", "channel": {"$ref": "#/channels/feedbackEvents"}},
            "rejectFeedback": {"action": "send", "channel": {"$ref": "#/channels/feedbackDlq"}},
            "releaseAdapter": {"action": "send", "channel": {"$ref": "#/channels/adapterReleased"}},
            "trialAdapter": {"action": "send", "channel": {"$ref": "#/channels/adapterCanary"}},
            "readFleetStatus": {"action": "receive", "channel": {"$ref": "#/channels/adapterStatus"}},
        },
        "components": {
            "messages": {
                "FeedbackEvent": {
                    "name": FEEDBACK_TYPE,
                    "headers": header_schema(_CE_HEADERS),
                    "payload": {"$ref": "./schemas/feedback-event.v1.json"},
                    "bindings": {"kafka": {"key": {"type": "string", "description": feedback.key}}},
                },
                "Rejected": {
                    "name": "rejected",
                    "headers": header_schema(_DLQ_HEADERS),
                    "payload": {"description": "The original record's bytes, untouched."},
                },
                "AdapterReleased": {
                    "name": RELEASED_TYPE,
                    "headers": header_schema(_CE_HEADERS),
                    "payload": {"$ref": "./schemas/adapter-released.v1.json"},
                    "bindings": {"kafka": {"key": {"type": "string", "description": released.key}}},
                },
                "AdapterCanary": {
                    "name": CANARY_TYPE,
                    "headers": header_schema(_CE_HEADERS),
                    "payload": {"$ref": "./schemas/adapter-canary.v1.json"},
                    "bindings": {"kafka": {"key": {"type": "string", "description": canary.key}}},
                },
                "NodeStatus": {
                    "name": STATUS_TYPE,
                    "headers": header_schema(_CE_HEADERS),
                    "payload": {"$ref": "./schemas/adapter-status.v1.json"},
                    "bindings": {"kafka": {"key": {"type": "string", "description": status.key}}},
                },
            }
        },
    }


def generated_files() -> dict[str, str]:
    """Relative path -> content of every generated contract file (default topic names)."""
    kafka = KafkaSettings()
    files = {
        f"schemas/{name}": json.dumps(schema, indent=2, sort_keys=True) + "\n"
        for name, schema in json_schemas().items()
    }
    for spec in topic_specs(kafka):
        files[f"topics/{spec.name}.yaml"] = yaml.safe_dump(spec.as_document(), sort_keys=False)
    files["asyncapi.yaml"] = yaml.safe_dump(_asyncapi(kafka), sort_keys=False)
    return files


def drift(root: Path) -> list[str]:
    """Paths whose committed content differs from the generated one."""
    return [
        path
        for path, text in generated_files().items()
        if not (root / path).is_file() or (root / path).read_text() != text
    ]


def write(root: Path) -> list[str]:
    changed = drift(root)
    for path, text in generated_files().items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return changed
