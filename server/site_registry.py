"""The sites registered with the SuperLink, by name: list, refuse a second key, unregister.

``flwr supernode list`` prints node ids but not the names keys were registered under, and Flower
accepts any number of keys under one name. The server scripts call this through Flower's own
Control API client over a named connection in ``$FLWR_HOME/config.toml``.

Usage: python server/site_registry.py CONNECTION {list | names | free NAME | unregister NAME}
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click
from flwr.cli.flower_config import read_superlink_connection
from flwr.cli.utils import flwr_cli_exc_handler, init_http_client_from_connection
from flwr.proto.control_pb2 import ListNodesRequest, UnregisterNodeRequest
from flwr.proto.node_pb2 import NodeInfo
from flwr.supercore.constant import NodeStatus
from flwr.supercore.control import ControlHttpClient


def registered(client: ControlHttpClient) -> list[NodeInfo]:
    """The nodes whose key is registered now (an unregistered key stays listed, as deleted)."""
    with flwr_cli_exc_handler():
        nodes = client.ListNodes(ListNodesRequest()).nodes_info
    return [node for node in nodes if node.status != NodeStatus.UNREGISTERED]


def _holders(client: ControlHttpClient, name: str) -> list[NodeInfo]:
    return [node for node in registered(client) if node.name == name]


def main(argv: Sequence[str]) -> int:
    """Run one command; 2 with one sentence when the name is taken or unknown."""
    connection, command, *names = argv
    client = init_http_client_from_connection(read_superlink_connection(connection))
    try:
        if command == "names":
            # The run's roster (federation.sites): every registered site is expected each round.
            names = sorted({node.name for node in registered(client) if node.name})
            print(",".join(repr(name) for name in names))
            return 0
        if command == "list":
            print(f"{'site':<24} {'node id':<22} status")
            for node in sorted(registered(client), key=lambda node: node.name):
                print(f"{node.name or '(no name)':<24} {node.node_id:<22} {node.status}")
            return 0
        (name,) = names
        holders = _holders(client, name)
        if command == "free":
            if holders:
                ids = ", ".join(str(node.node_id) for node in holders)
                print(
                    f"error: the name {name} is already registered (node {ids}); one key per site: "
                    f"server/unregister-site.sh --name {name} first if the site's key changed.",
                    file=sys.stderr,
                )
                return 2
            return 0
        if not holders:
            print(
                f"error: no registered site is named {name} (server/list-sites.sh lists them).",
                file=sys.stderr,
            )
            return 2
        for node in holders:
            with flwr_cli_exc_handler():
                client.UnregisterNode(UnregisterNodeRequest(node_id=node.node_id))
            print(f"Unregistered {name} (node {node.node_id}); its SuperNode can no longer join.")
        return 0
    except click.ClickException as err:
        print(f"error: {err.format_message()}", file=sys.stderr)
        return 1
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
