"""The pynetdicom internals pacsnode builds on still exist, with the signatures it expects.

pacsnode.node.dicom.server subclasses pynetdicom's association server, request handler and ACSE
and overrides private methods; pacsnode.node.app sets private configuration and appends to
``AE._servers``; pacsnode.node.dicom.qr reads the DUL's queues and socket; pacsnode.node.dicom.contexts
reads ``sop_class._STORAGE_CLASSES``. None of that is public API: a pynetdicom release may change it
without notice, and an override of a method that was renamed is silently never called. Each test
here names what changed and the pynetdicom version pacsnode was written against, so that an
upgrade fails here, loudly, rather than in the field.
"""

from __future__ import annotations

import copy
import inspect
import queue
import socketserver
import tomllib
from collections.abc import Callable
from typing import Any

import pynetdicom
import pytest
from pynetdicom import _config as pynetdicom_config
from pynetdicom import sop_class
from pynetdicom.acse import ACSE
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association, ServiceUser
from pynetdicom.events import EVT_REJECTED, trigger
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.transport import AssociationServer, AssociationSocket, RequestHandler, ThreadedAssociationServer

from pacsnode.node.dicom import server as node_server
from tests.support.helpers import REPO

#: The requirement in pyproject.toml, and the release these expectations were read from.
PINNED = "pynetdicom>=3.0,<3.1"
WRITTEN_AGAINST = "3.0.4"


def _why(what: str) -> str:
    return (
        f"pynetdicom {pynetdicom.__version__} (pacsnode pins {PINNED}, written against {WRITTEN_AGAINST}): "
        f"{what}; review pacsnode.node.dicom.server, pacsnode.node.app and this test before upgrading"
    )


def _parameters(func: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    """(name, kind, default) of each parameter: annotations may change spelling, these may not."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(func).parameters.values()]


P = inspect.Parameter
POS = P.POSITIONAL_OR_KEYWORD


def test_the_pin_in_pyproject_is_the_one_checked_here() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pins = [d.replace(" ", "") for d in project["dependencies"] if d.replace(" ", "").startswith("pynetdicom")]
    assert pins == [PINNED], (
        f"pyproject.toml now requires {pins}, this test checks the internals of {PINNED}: "
        "re-read the internals pacsnode uses in the new release and update PINNED, WRITTEN_AGAINST and the tests"
    )


# (owner, name, expected parameters) of every private or overridden pynetdicom callable pacsnode relies on.
SIGNATURES: list[tuple[type | Any, str, list[tuple[str, Any, Any]]]] = [
    # server.py: _PolicyACSE(ACSE) calls ACSE.__init__(assoc) and overrides _negotiate_as_acceptor()
    (ACSE, "__init__", [("self", POS, P.empty), ("assoc", POS, P.empty)]),
    (ACSE, "_negotiate_as_acceptor", [("self", POS, P.empty)]),
    (
        ACSE,
        "send_reject",
        [("self", POS, P.empty), ("result", POS, P.empty), ("source", POS, P.empty), ("diagnostic", POS, P.empty)],
    ),
    # server.py: _NodeRequestHandler overrides _create_association() and returns super()'s association
    (RequestHandler, "_create_association", [("self", POS, P.empty)]),
    # permissions.py: gate_requests wraps each accepted association's _serve_request(msg, context_id)
    (
        Association,
        "_serve_request",
        [("self", POS, P.empty), ("msg", POS, P.empty), ("context_id", POS, P.empty)],
    ),
    # server.py: NodeServer passes these positionally, then request_handler by keyword
    (
        ThreadedAssociationServer,
        "__init__",
        [
            ("self", POS, P.empty),
            ("ae", POS, P.empty),
            ("address", POS, P.empty),
            ("ae_title", POS, P.empty),
            ("contexts", POS, P.empty),
            ("ssl_context", POS, None),
            ("evt_handlers", POS, None),
            ("request_handler", POS, None),
        ],
    ),
    # server.py: NodeServer overrides these (socketserver's protocol, as AssociationServer extends it)
    (AssociationServer, "server_bind", [("self", POS, P.empty)]),
    (AssociationServer, "server_activate", [("self", POS, P.empty)]),
    (AssociationServer, "get_request", [("self", POS, P.empty)]),
    # server.py: trigger(assoc, EVT_REJECTED, {}) after a policy rejection
    (trigger, "__call__", [("assoc", POS, P.empty), ("event", POS, P.empty), ("attrs", POS, None)]),
    # app.py: ae.make_server(address, evt_handlers=..., server_class=NodeServer, listen_socket=..., policy=...)
    (
        ApplicationEntity,
        "make_server",
        [
            ("self", POS, P.empty),
            ("address", POS, P.empty),
            ("ae_title", POS, None),
            ("contexts", POS, None),
            ("ssl_context", POS, None),
            ("evt_handlers", POS, None),
            ("server_class", POS, None),
            ("kwargs", P.VAR_KEYWORD, P.empty),
        ],
    ),
]


@pytest.mark.parametrize(
    ("owner", "name", "expected"),
    SIGNATURES,
    ids=[f"{getattr(o, '__qualname__', o)}.{n}" for o, n, _ in SIGNATURES],
)
def test_signature(owner: Any, name: str, expected: list[tuple[str, Any, Any]]) -> None:
    func = owner if name == "__call__" else inspect.getattr_static(owner, name, None)
    qualname = getattr(owner, "__qualname__", owner) if name == "__call__" else f"{owner.__qualname__}.{name}"
    assert callable(func), _why(f"{qualname} is gone")
    assert _parameters(func) == expected, _why(f"{qualname}{inspect.signature(func)} changed")


def test_the_overridden_methods_are_still_called() -> None:
    """An override of a method pynetdicom no longer calls would be dead code, and the policy unenforced."""
    negotiate = inspect.getsource(ACSE.negotiate_association)
    assert "self._negotiate_as_acceptor()" in negotiate, _why(
        "ACSE.negotiate_association no longer calls _negotiate_as_acceptor (the peer policy's hook)"
    )
    handle = inspect.getsource(RequestHandler.handle)
    assert "self._create_association()" in handle, _why(
        "RequestHandler.handle no longer calls _create_association (where the policy ACSE is installed)"
    )
    create = inspect.getsource(RequestHandler._create_association)
    assert "deepcopy(self.server.contexts)" in create, _why(
        "RequestHandler._create_association no longer deep-copies the server's contexts "
        "(_SupportedContexts.__deepcopy__ makes that copy cheap)"
    )
    assert "self.server" in inspect.getsource(socketserver.BaseRequestHandler.__init__)


def test_the_classes_pacsnode_subclasses() -> None:
    assert issubclass(ThreadedAssociationServer, AssociationServer), _why("ThreadedAssociationServer's base")
    assert issubclass(ThreadedAssociationServer, socketserver.ThreadingMixIn), _why(
        "ThreadedAssociationServer is no longer a socketserver.ThreadingMixIn (NodeServer sets daemon_threads)"
    )
    assert issubclass(AssociationServer, socketserver.TCPServer), _why(
        "AssociationServer is no longer a socketserver.TCPServer (NodeServer replaces self.socket in server_bind)"
    )
    assert issubclass(RequestHandler, socketserver.BaseRequestHandler), _why("RequestHandler's base")
    assert isinstance(inspect.getattr_static(AssociationServer, "active_associations"), property), _why(
        "AssociationServer.active_associations (NodeServer.get_request counts them) is not a property"
    )
    for name in ("requestor", "acceptor", "assoc"):
        assert isinstance(inspect.getattr_static(ACSE, name), property), _why(f"ACSE.{name} is not a property")
    assert EVT_REJECTED.name == "EVT_REJECTED", _why("EVT_REJECTED")


def test_the_attributes_pacsnode_reads_and_writes() -> None:
    """Instance attributes: ``AE._servers``, ``assoc.acse``, the service user's and the DUL's fields."""
    ae = ApplicationEntity()
    assert isinstance(getattr(ae, "_servers", None), list), _why("AE._servers (app.py appends its server) is gone")
    assoc = Association(ae, "acceptor")
    assert isinstance(assoc.acse, ACSE), _why("Association.acse (server.py replaces it) is gone")
    assert callable(assoc.kill), _why("Association.kill (server.py ends a rejected association) is gone")
    requestor = assoc.requestor
    assert isinstance(requestor, ServiceUser)
    for name in ("primitive", "ae_title", "address"):  # server.py's _PolicyACSE reads these
        present = name in vars(requestor) or inspect.getattr_static(ServiceUser, name, None) is not None
        assert present, _why(f"ServiceUser.{name} is gone")
    dul = assoc.dul
    # qr.py's _let_reactor_catch_up reads the DUL's queues and its AssociationSocket's socket
    assert isinstance(dul.to_provider_queue, queue.Queue), _why("DULServiceProvider.to_provider_queue is gone")
    assert isinstance(dul.event_queue, queue.Queue), _why("DULServiceProvider.event_queue is gone")
    assert "socket" in vars(dul), _why("DULServiceProvider.socket is gone")
    assert "self.socket" in inspect.getsource(AssociationSocket.__init__), _why("AssociationSocket.socket is gone")


def test_the_configuration_switches_pacsnode_sets() -> None:
    for name in ("LOG_HANDLER_LEVEL", "STORE_SEND_CHUNKED_DATASET"):  # app.configure_pynetdicom
        assert hasattr(pynetdicom_config, name), _why(f"pynetdicom._config.{name} is gone")
    assert isinstance(getattr(sop_class, "_STORAGE_CLASSES", None), dict), _why(
        "pynetdicom.sop_class._STORAGE_CLASSES (contexts.py lists the storage classes from it) is gone"
    )


def test_supported_contexts_copy_keeps_each_associations_transfer_syntaxes_apart() -> None:
    """_SupportedContexts.__deepcopy__ relies on PresentationContext keeping its syntaxes in ``_transfer_syntax``."""
    original = build_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
    assert isinstance(getattr(original, "_transfer_syntax", None), list), _why(
        "PresentationContext._transfer_syntax is gone"
    )
    contexts = node_server._SupportedContexts([original])
    (clone,) = copy.deepcopy(contexts)
    assert isinstance(clone, PresentationContext) and clone is not original
    clone.add_transfer_syntax("1.2.840.10008.1.2")
    assert original.transfer_syntax == ["1.2.840.10008.1.2.1"], _why(
        "PresentationContext.transfer_syntax is no longer the _transfer_syntax list"
    )
    assert clone.transfer_syntax == ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
