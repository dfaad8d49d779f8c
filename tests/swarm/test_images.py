"""How an image's configuration survives the flattening that carries it into the second engine."""

from __future__ import annotations

from typing import Any

import pytest

from tests.swarm.swarmlib import import_changes


@pytest.mark.parametrize(
    ("config", "changes"),
    [
        ({}, []),
        (
            {"Env": ["PATH=/opt/upsync/bin:/usr/bin", 'Q=say "hi" $HOME']},
            ['ENV PATH="/opt/upsync/bin:/usr/bin"', 'ENV Q="say \\"hi\\" \\$HOME"'],
        ),
        (
            {
                "Entrypoint": ["tini", "--", "docker-entrypoint.sh"],
                "Cmd": ["run"],
                "User": "10001:10001",
                "WorkingDir": "/etc/upsync",
            },
            [
                'ENTRYPOINT ["tini", "--", "docker-entrypoint.sh"]',
                'CMD ["run"]',
                "USER 10001:10001",
                "WORKDIR /etc/upsync",
            ],
        ),
        (
            {"Volumes": {"/srv/uploads": {}}, "ExposedPorts": {"80/tcp": {}, "22/tcp": {}}},
            ['VOLUME ["/srv/uploads"]', "EXPOSE 22/tcp", "EXPOSE 80/tcp"],
        ),
        (
            {
                "Healthcheck": {
                    "Test": ["CMD", "upsync-node-health"],
                    "Interval": 5_000_000_000,
                    "Timeout": 5_000_000_000,
                    "StartPeriod": 20_000_000_000,
                    "Retries": 3,
                }
            },
            [
                'HEALTHCHECK --interval=5000ms --timeout=5000ms --start-period=20000ms --retries=3 CMD ["upsync-node-health"]'  # noqa: E501
            ],
        ),
        ({"Healthcheck": {"Test": ["CMD-SHELL", "curl -f localhost"]}}, ["HEALTHCHECK CMD curl -f localhost"]),
        ({"Healthcheck": {"Test": ["NONE"]}}, ["HEALTHCHECK NONE"]),
    ],
)
def test_import_changes(config: dict[str, Any], changes: list[str]) -> None:
    assert import_changes(config) == changes
