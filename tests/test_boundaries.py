"""The import boundaries the layout relies on (DESIGN.md "Boundaries"; docs/architecture.md
"Tenancy"), checked on the import graph (grimp, the graph library of import-linter)."""

from __future__ import annotations

import grimp
import pytest


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("tenants", "webplatform", "inference", cache_dir=None)


@pytest.mark.parametrize("layer", ["webplatform", "inference"])
def test_tenants_imports_nothing_above_it(graph, layer) -> None:
    chain = graph.find_shortest_chain(importer="tenants", imported=layer, as_packages=True)
    assert chain is None, " -> ".join(chain)


def test_the_completion_path_does_not_reach_into_the_dashboard(graph) -> None:
    """Settlement calls tenancy's hook (``tenants.services.content_logging``) directly."""
    chain = graph.find_shortest_chain(
        importer="webplatform.completions", imported="webplatform.dashboard", as_packages=True
    )
    assert chain is None, " -> ".join(chain)


@pytest.mark.parametrize("module", ["webplatform.chat.consumers", "webplatform.chat.tickets"])
def test_the_websocket_code_reads_tenancy_through_selectors(graph, module) -> None:
    models = [
        name
        for name in ("tenants.models", "webplatform.models")
        if graph.direct_import_exists(importer=module, imported=name)
    ]
    assert models == []


def test_the_websocket_chat_does_not_import_the_rest_api(graph) -> None:
    """Both entry points share the request path and its schema (``webplatform.completions``);
    neither reaches into the other."""
    for importer, imported in (
        ("webplatform.chat", "webplatform.api"),
        ("webplatform.api", "webplatform.chat.consumers"),
    ):
        chain = graph.find_shortest_chain(importer=importer, imported=imported, as_packages=True)
        assert chain is None, " -> ".join(chain)


def test_the_request_path_has_no_import_cycle(graph) -> None:
    """Each step of ``webplatform.completions`` imports only the steps before it."""
    modules = sorted(graph.find_children("webplatform.completions"))
    cycles = [
        (a, b)
        for a in modules
        for b in modules
        if a < b
        and graph.find_shortest_chain(importer=a, imported=b)
        and graph.find_shortest_chain(importer=b, imported=a)
    ]
    assert cycles == []
