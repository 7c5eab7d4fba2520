"""A stand-in for Asterisk's Manager Interface, because Asterisk cannot run here.

Asterisk is not packaged in Debian 12, so the health collector's AMI client is
tested against this server instead. It speaks the protocol as Asterisk's
``main/manager.c`` writes it: the banner ``Asterisk Call Manager/<version>``,
``\\r\\n``-framed ``Key: Value`` messages ended by an empty line, ``ActionID``
echoed in every reply, lists as ``Response: Success`` + ``EventList: start``,
one event per item and a closing ``...Complete`` event with ``EventList:
Complete`` and ``ListItems``. Login failure is answered after a second with
``Authentication failed`` and the connection closed, an action the account's
*write* classes do not cover gets ``Permission denied``, an unknown one
``Invalid/unknown command``, exactly as ``process_message`` does.

Each reply is rendered by a function below in the field order of the Asterisk
source named in its docstring; tests/fixtures/ami/*.txt keep the transcripts of
the sample PBX (:meth:`PbxModel.sample`) and a test checks that the server still
renders them byte for byte.

Faults a test can switch on while the server runs: refuse connections (stop
listening), a wrong secret, drop the connection in the middle of a list, a slow
reply, a list that never completes, asynchronous events interleaved with the
replies, a banner that is not AMI.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ami"

#: main/manager.c and the modules: the write classes each action is registered with
#: (``ast_manager_register_xml``); 0 = any logged-in account may run it.
AUTHORITY: dict[str, frozenset[str]] = {
    "Ping": frozenset(),
    "Logoff": frozenset(),
    "CoreStatus": frozenset({"system", "reporting"}),
    "CoreSettings": frozenset({"system", "reporting"}),
    "CoreShowChannels": frozenset({"system", "reporting"}),
    "PJSIPShowRegistrationsOutbound": frozenset({"system", "reporting"}),
    "PJSIPShowContacts": frozenset({"system"}),
    "PJSIPShowEndpoints": frozenset({"system"}),
    "SIPshowregistry": frozenset({"system", "reporting"}),
    "QueueSummary": frozenset(),
    "Originate": frozenset({"originate"}),
    "Reload": frozenset({"system", "config"}),
}


@dataclass
class Contact:
    """A PJSIP contact (res/res_pjsip/location.c, pjsip_options.c)."""

    aor: str
    uri: str
    endpoint: str = ""  # empty for a static contact= of an AoR (trunks)
    status: str = "Reachable"  # Reachable, Unreachable, NonQualified, Unknown
    rtt_us: int | None = 12_345
    user_agent: str = ""
    via_addr: str = ""
    via_port: int = 0
    call_id: str = ""
    expiration: int = 0
    qualify_frequency: int = 60

    @property
    def object_name(self) -> str:
        """Sorcery id of a contact: ``aor;@`` and a hash of the URI."""
        import hashlib

        return f"{self.aor};@{hashlib.md5(self.uri.encode()).hexdigest()}"


@dataclass
class Endpoint:
    """A PJSIP endpoint with its AoR (same name, as FreePBX makes them)."""

    name: str
    auths: str = ""
    outbound_auths: str = ""
    contacts: list[Contact] = field(default_factory=list)
    device_state: str = "Not in use"
    active_channels: int = 0
    transport: str = "0.0.0.0-udp"


@dataclass
class Registration:
    """A PJSIP outbound registration and its auth (res_pjsip_outbound_registration.c)."""

    name: str
    client_uri: str
    server_uri: str
    endpoint: str = ""
    status: str = "Registered"  # Registered, Unregistered, Rejected
    auth_username: str = ""
    auth_password: str = ""
    contact_user: str = ""
    next_reg: int = 3540


@dataclass
class Channel:
    """A channel as CoreShowChannels lists it (ast_manager_build_channel_state_string)."""

    name: str
    state: int  # 4 Ring, 5 Ringing, 6 Up
    caller_num: str
    caller_name: str
    connected_num: str
    connected_name: str
    context: str
    exten: str
    uniqueid: str
    linkedid: str
    application: str = "Dial"
    app_data: str = ""
    duration: str = "00:01:05"
    bridge_id: str = ""


STATE_DESC = {0: "Down", 4: "Ring", 5: "Ringing", 6: "Up"}


@dataclass
class Queue:
    """One app_queue queue's summary."""

    name: str
    logged_in: int
    available: int
    callers: int
    holdtime: int = 20
    talktime: int = 180
    longest: int = 0


@dataclass
class SipRegistry:
    """A chan_sip ``register =>`` line (chan_sip.c manager_show_registry)."""

    host: str
    username: str
    state: str = "Registered"
    port: int = 5060
    refresh: int = 105
    regtime: int = 1_764_500_000


@dataclass
class PbxModel:
    """Everything the stand-in Asterisk knows; tests change it between questions."""

    version: str = "20.11.0"
    ami_version: str = "9.0.0"
    system_name: str = ""
    startup: dt.datetime = dt.datetime(2026, 11, 28, 9, 15, 2)
    reload: dt.datetime = dt.datetime(2026, 11, 28, 14, 2, 40)
    processed_calls: int = 1843
    endpoints: list[Endpoint] = field(default_factory=list)
    registrations: list[Registration] = field(default_factory=list)
    channels: list[Channel] = field(default_factory=list)
    queues: list[Queue] = field(default_factory=list)
    sip_registry: list[SipRegistry] | None = None  # None: chan_sip is not loaded

    @classmethod
    def sample(cls) -> PbxModel:
        """A small FreePBX box: two trunks, three phones, one call, one queue."""
        phones = [
            Endpoint(
                "1001",
                auths="1001",
                contacts=[
                    Contact(
                        "1001",
                        "sip:1001@192.0.2.21:5060;ob",
                        endpoint="1001",
                        rtt_us=3120,
                        user_agent="Yealink SIP-T46U 108.86.0.45",
                        via_addr="192.0.2.21",
                        via_port=5060,
                        call_id="5f0c8e1a-61c2",
                        expiration=1764597600,
                    )
                ],
                device_state="In use",
                active_channels=1,
            ),
            Endpoint(
                "1002",
                auths="1002",
                contacts=[
                    Contact(
                        "1002",
                        "sip:1002@192.0.2.22:5060",
                        endpoint="1002",
                        status="Unreachable",
                        rtt_us=None,
                        user_agent="Grandstream GXP2170 1.0.11.23",
                        via_addr="192.0.2.22",
                        via_port=5060,
                        call_id="a91b-77",
                        expiration=1764597611,
                    )
                ],
                device_state="Unavailable",
            ),
            Endpoint("1003", auths="1003", device_state="Unavailable"),
        ]
        trunks = [
            Endpoint(
                "telco-a",
                outbound_auths="telco-a",
                contacts=[Contact("telco-a", "sip:sip.telco-a.example:5060", rtt_us=23_456)],
                active_channels=1,
            ),
            Endpoint(
                "telco-b",
                contacts=[
                    Contact("telco-b", "sip:203.0.113.9:5060", status="Unreachable", rtt_us=None)
                ],
                device_state="Unavailable",
            ),
        ]
        return cls(
            endpoints=trunks + phones,
            registrations=[
                Registration(
                    "telco-a",
                    client_uri="sip:+4930555123@sip.telco-a.example",
                    server_uri="sip:sip.telco-a.example",
                    endpoint="telco-a",
                    auth_username="+4930555123",
                    auth_password="Tr4nkP4ss",
                    contact_user="+4930555123",
                )
            ],
            channels=[
                Channel(
                    "PJSIP/1001-00000012",
                    6,
                    "1001",
                    "Front Desk",
                    "+4930777000",
                    "Example Client",
                    "from-internal",
                    "004930777000",
                    "1764332000.36",
                    "1764332000.36",
                    app_data="PJSIP/004930777000@telco-a,300,Tb(func-apply-sipheaders^s^1)",
                ),
                Channel(
                    "PJSIP/telco-a-00000013",
                    6,
                    "004930777000",
                    "<unknown>",
                    "1001",
                    "Front Desk",
                    "from-trunk-pjsip-telco-a",
                    "s",
                    "1764332000.37",
                    "1764332000.36",
                    application="AppDial",
                    app_data="(Outgoing Line)",
                ),
            ],
            queues=[Queue("400", logged_in=3, available=2, callers=1, longest=35)],
        )

    @classmethod
    def big(cls, endpoints: int = 500, trunks: int = 50, channels: int = 200) -> PbxModel:
        """A large box for the benchmark: ``endpoints`` phones, ``trunks`` trunks, calls up."""
        m = cls()
        for i in range(trunks):
            name = f"carrier-{i:02d}"
            m.endpoints.append(
                Endpoint(
                    name,
                    outbound_auths=name,
                    contacts=[Contact(name, f"sip:sip{i}.carrier.example:5060", rtt_us=20_000 + i)],
                )
            )
            m.registrations.append(
                Registration(
                    name,
                    client_uri=f"sip:+49305550{i:04d}@sip{i}.carrier.example",
                    server_uri=f"sip:sip{i}.carrier.example",
                    endpoint=name,
                    status="Registered" if i % 10 else "Rejected",
                    auth_username=f"+49305550{i:04d}",
                    auth_password=f"pw{i:04d}xyz",
                )
            )
        for i in range(endpoints):
            ext = str(2000 + i)
            contacts = (
                [
                    Contact(
                        ext,
                        f"sip:{ext}@10.1.{i // 250}.{i % 250}:5060",
                        endpoint=ext,
                        rtt_us=2000 + i,
                        user_agent="Yealink SIP-T54W 96.86.0.100",
                        via_addr=f"10.1.{i // 250}.{i % 250}",
                        via_port=5060,
                        call_id=f"{i:08x}-call",
                        expiration=1764597600 + i,
                    )
                ]
                if i % 5
                else []
            )
            m.endpoints.append(
                Endpoint(
                    ext,
                    auths=ext,
                    contacts=contacts,
                    device_state="Not in use" if contacts else "Unavailable",
                )
            )
        for i in range(channels):
            if i % 2:
                name = f"PJSIP/carrier-{i % trunks:02d}-{i:08x}"
                context = f"from-trunk-pjsip-carrier-{i % trunks:02d}"
            else:
                name = f"PJSIP/{2000 + i % endpoints}-{i:08x}"
                context = "from-internal"
            m.channels.append(
                Channel(
                    name,
                    6 if i % 7 else 5,
                    f"+4917{i:08d}",
                    f"Caller {i}",
                    str(2000 + i % endpoints),
                    f"Agent {i}",
                    context,
                    "s",
                    f"1764332000.{i}",
                    f"1764332000.{i - i % 2}",
                )
            )
        m.queues = [Queue(str(400 + q), 5, 2, q % 3, longest=q * 7) for q in range(10)]
        return m


# -- rendering, in Asterisk's field order ---------------------------------------------------


REGISTRATIONS_FOLLOW = "Following are Events for each Outbound registration"


def unknown_command(name: str) -> str:
    """main/manager.c process_message: the reply to an action no loaded module registers."""
    return f"Invalid/unknown command: {name}. Use Action: ListCommands to show available commands."


def _msg(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _aid(action_id: str) -> list[str]:
    return [f"ActionID: {action_id}"] if action_id else []


def response(action_id: str, resp: str, message: str | None, listflag: str | None = None) -> bytes:
    """main/manager.c astman_send_response_full: Response, ActionID, EventList, Message."""
    lines = [f"Response: {resp}", *_aid(action_id)]
    if listflag:
        lines.append(f"EventList: {listflag}")
    if message is not None:
        lines.append(f"Message: {message}")
    return _msg(*lines)


def list_complete(action_id: str, event: str, count: int, *extra: str) -> bytes:
    """main/manager.c astman_send_list_complete_start/_end."""
    head = [f"Event: {event}", *_aid(action_id), "EventList: Complete", f"ListItems: {count}"]
    return _msg(*head, *extra)


def render_corestatus(m: PbxModel, action_id: str) -> list[bytes]:
    """main/manager.c action_corestatus."""
    return [
        _msg(
            "Response: Success",
            *_aid(action_id),
            f"CoreStartupDate: {m.startup:%Y-%m-%d}",
            f"CoreStartupTime: {m.startup:%H:%M:%S}",
            f"CoreReloadDate: {m.reload:%Y-%m-%d}",
            f"CoreReloadTime: {m.reload:%H:%M:%S}",
            f"CoreCurrentCalls: {len(m.channels)}",
            f"CoreProcessedCalls: {m.processed_calls}",
        )
    ]


def render_coresettings(m: PbxModel, action_id: str) -> list[bytes]:
    """main/manager.c action_coresettings."""
    return [
        _msg(
            "Response: Success",
            *_aid(action_id),
            f"AMIversion: {m.ami_version}",
            f"AsteriskVersion: {m.version}",
            f"SystemName: {m.system_name}",
            "CoreMaxCalls: 0",
            "CoreMaxLoadAvg: 0.000000",
            "CoreRunUser: asterisk",
            "CoreRunGroup: asterisk",
            "CoreMaxFilehandles: 0",
            "CoreRealTimeEnabled: No",
            "CoreCDRenabled: Yes",
            "CoreHTTPenabled: Yes",
            "SoundsSearchCustomDir: No",
        )
    ]


def render_coreshowchannels(m: PbxModel, action_id: str) -> list[bytes]:
    """main/manager.c action_coreshowchannels + manager_channels.c channel state string."""
    out = [response(action_id, "Success", "Channels will follow", "start")]
    for c in m.channels:
        out.append(
            _msg(
                "Event: CoreShowChannel",
                *_aid(action_id),
                f"Channel: {c.name}",
                f"ChannelState: {c.state}",
                f"ChannelStateDesc: {STATE_DESC.get(c.state, 'Unknown')}",
                f"CallerIDNum: {c.caller_num}",
                f"CallerIDName: {c.caller_name}",
                f"ConnectedLineNum: {c.connected_num}",
                f"ConnectedLineName: {c.connected_name}",
                "Language: en",
                "AccountCode: ",
                f"Context: {c.context}",
                f"Exten: {c.exten}",
                "Priority: 1",
                f"Uniqueid: {c.uniqueid}",
                f"Linkedid: {c.linkedid}",
                f"Application: {c.application}",
                f"ApplicationData: {c.app_data}",
                f"Duration: {c.duration}",
                f"BridgeId: {c.bridge_id}",
            )
        )
    out.append(list_complete(action_id, "CoreShowChannelsComplete", len(m.channels)))
    return out


def render_registrations(m: PbxModel, action_id: str) -> list[bytes]:
    """res_pjsip_outbound_registration.c ami_show_outbound_registrations (+ AuthDetail)."""
    out = [response(action_id, "Success", REGISTRATIONS_FOLLOW, "start")]
    registered = 0
    for r in m.registrations:
        registered += r.status == "Registered"
        out.append(
            _msg(
                "Event: OutboundRegistrationDetail",
                *_aid(action_id),
                "ObjectType: registration",
                f"ObjectName: {r.name}",
                "MaxRetries: 10000",
                f"ClientUri: {r.client_uri}",
                "SecurityNegotiation: no",
                "AuthRejectionPermanent: true",
                f"ServerUri: {r.server_uri}",
                "MaxRandomInitialDelay: 10",
                "SupportPath: false",
                "RetryInterval: 60",
                "ContactHeaderParams: ",
                "Expiration: 3600",
                "Transport: 0.0.0.0-udp",
                "Line: no",
                f"ContactUser: {r.contact_user}",
                f"Endpoint: {r.endpoint}",
                "UserAgent: ",
                "ForbiddenRetryInterval: 10",
                f"OutboundAuth: {r.name}",
                "OutboundProxy: ",
                "FatalRetryInterval: 30",
                "SupportOutbound: no",
                f"Status: {r.status}",
                f"NextReg: {r.next_reg}",
            )
        )
        out.append(
            _msg(
                "Event: AuthDetail",
                *_aid(action_id),
                "ObjectType: auth",
                f"ObjectName: {r.name}",
                f"Username: {r.auth_username}",
                f"Password: {r.auth_password}",
                "Md5Cred: ",
                "Realm: ",
                "NonceLifetime: 32",
                "AuthType: userpass",
            )
        )
    n = len(m.registrations)
    out.append(
        list_complete(
            action_id,
            "OutboundRegistrationDetailComplete",
            n,
            f"Registered: {registered}",
            f"NotRegistered: {n - registered}",
        )
    )
    return out


def render_endpoints(m: PbxModel, action_id: str) -> list[bytes]:
    """res_pjsip/pjsip_configuration.c ami_show_endpoints / format_ami_endpoints."""
    if not m.endpoints:
        return [response(action_id, "Error", "No endpoints found\n")]
    out = [
        response(
            action_id,
            "Success",
            "A listing of Endpoints follows, presented as EndpointList events",
            "start",
        )
    ]
    for e in m.endpoints:
        contacts = "".join(f"{c.aor}/{c.uri}," for c in e.contacts)
        out.append(
            _msg(
                "Event: EndpointList",
                *_aid(action_id),
                "ObjectType: endpoint",
                f"ObjectName: {e.name}",
                f"Transport: {e.transport}",
                f"Aor: {e.name}",
                f"Auths: {e.auths}",
                f"OutboundAuths: {e.outbound_auths}",
                f"Contacts: {contacts}",
                f"DeviceState: {e.device_state}",
                f"ActiveChannels: {e.active_channels}",
            )
        )
    out.append(list_complete(action_id, "EndpointListComplete", len(m.endpoints)))
    return out


def render_contacts(m: PbxModel, action_id: str) -> list[bytes]:
    """res_pjsip/pjsip_options.c ami_show_contacts / format_ami_contactlist_handler."""
    contacts = [c for e in m.endpoints for c in e.contacts]
    if not contacts:
        return [response(action_id, "Error", "No Contacts found\n")]
    out = [
        response(
            action_id,
            "Success",
            "A listing of Contacts follows, presented as ContactList events",
            "start",
        )
    ]
    for c in contacts:
        rtt = str(c.rtt_us) if c.status == "Reachable" and c.rtt_us is not None else "N/A"
        out.append(
            _msg(
                "Event: ContactList",
                *_aid(action_id),
                "ObjectType: contact",
                f"ObjectName: {c.object_name}",
                f"ViaAddr: {c.via_addr}",
                f"ViaPort: {c.via_port}",
                "QualifyTimeout: 3.000000",
                f"CallId: {c.call_id}",
                "RegServer: ",
                "PruneOnBoot: no",
                "Path: ",
                f"Endpoint: {c.endpoint}",
                "AuthenticateQualify: no",
                f"Uri: {c.uri}",
                f"QualifyFrequency: {c.qualify_frequency}",
                f"UserAgent: {c.user_agent}",
                f"ExpirationTime: {c.expiration}",
                "OutboundProxy: ",
                "Qualify2xxOnly: false",
                f"Status: {c.status}",
                f"RoundtripUsec: {rtt}",
            )
        )
    out.append(list_complete(action_id, "ContactListComplete", len(contacts)))
    return out


def render_sipshowregistry(m: PbxModel, action_id: str) -> list[bytes]:
    """channels/chan_sip.c manager_show_registry (chan_sip, removed in Asterisk 21)."""
    assert m.sip_registry is not None
    out = [response(action_id, "Success", "Registrations will follow", "start")]
    for r in m.sip_registry:
        out.append(
            _msg(
                "Event: RegistryEntry",
                *_aid(action_id),
                f"Host: {r.host}",
                f"Port: {r.port}",
                f"Username: {r.username}",
                f"Domain: {r.host}",
                "DomainPort: 5060",
                f"Refresh: {r.refresh}",
                f"State: {r.state}",
                f"RegistrationTime: {r.regtime}",
            )
        )
    out.append(list_complete(action_id, "RegistrationsComplete", len(m.sip_registry)))
    return out


def render_queuesummary(m: PbxModel, action_id: str) -> list[bytes]:
    """apps/app_queue.c manager_queues_summary: note the ActionID at the end of each event."""
    out = [response(action_id, "Success", "Queue summary will follow", "start")]
    for q in m.queues:
        out.append(
            _msg(
                "Event: QueueSummary",
                f"Queue: {q.name}",
                f"LoggedIn: {q.logged_in}",
                f"Available: {q.available}",
                f"Callers: {q.callers}",
                f"HoldTime: {q.holdtime}",
                f"TalkTime: {q.talktime}",
                f"LongestHoldTime: {q.longest}",
                *_aid(action_id),
            )
        )
    out.append(list_complete(action_id, "QueueSummaryComplete", len(m.queues)))
    return out


RENDERERS: dict[str, Callable[[PbxModel, str], list[bytes]]] = {
    "CoreStatus": render_corestatus,
    "CoreSettings": render_coresettings,
    "CoreShowChannels": render_coreshowchannels,
    "PJSIPShowRegistrationsOutbound": render_registrations,
    "PJSIPShowEndpoints": render_endpoints,
    "PJSIPShowContacts": render_contacts,
    "SIPshowregistry": render_sipshowregistry,
    "QueueSummary": render_queuesummary,
}


def async_event(n: int) -> bytes:
    """An event an account with read classes would see (Newchannel), with no ActionID."""
    return _msg(
        "Event: Newchannel",
        "Privilege: call,all",
        f"Channel: PJSIP/1001-0000{n:04x}",
        "ChannelState: 4",
        "ChannelStateDesc: Ring",
        "CallerIDNum: 1001",
        "CallerIDName: Front Desk",
        "ConnectedLineNum: <unknown>",
        "ConnectedLineName: <unknown>",
        "Language: en",
        "AccountCode: ",
        "Context: from-internal",
        "Exten: 5551234",
        "Priority: 1",
        f"Uniqueid: 1764332100.{n}",
        f"Linkedid: 1764332100.{n}",
    )


def parse_action(block: bytes) -> dict[str, str]:
    """One action as a client sent it."""
    out: dict[str, str] = {}
    for line in block.decode("utf-8", "replace").split("\r\n"):
        k, _, v = line.partition(":")
        out[k.strip()] = v.strip()
    return out


# -- the server -----------------------------------------------------------------------------


class AmiServer:
    """The stand-in Asterisk, on a loopback port, in a thread of its own.

    Every attribute a test sets (``model``, ``secret``, the fault switches) is read
    when the next action arrives, so tests change behaviour while clients stay
    connected, as an administrator changing Asterisk would.
    """

    def __init__(
        self,
        model: PbxModel | None = None,
        *,
        username: str = "pbx-agent",
        secret: str = "s3cret-ami-pass",
        write: frozenset[str] = frozenset({"system", "reporting"}),
        port: int = 0,
    ) -> None:
        self.model = model or PbxModel.sample()
        self.username = username
        self.secret = secret
        self.write = write
        self.port = port
        self.banner = b"Asterisk Call Manager/9.0.0\r\n"
        self.auth_fail_delay = 1.0  # main/manager.c action_login: sleep(1) before the error
        self.drop_in_list: dict[str, int] = {}  # action -> close after this many events
        self.never_complete: set[str] = set()
        self.slow: dict[str, float] = {}
        self.interleave = False
        self.connections = 0
        self.logins_ok = 0
        self.logins_failed = 0
        self.actions: list[str] = []
        self.received: list[dict[str, str]] = []
        self.events_sent = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread.start()

    def __enter__(self) -> AmiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> None:
        """Listen (again) on the same port."""

        async def start() -> None:
            self._server = await asyncio.start_server(self._serve, HOST, self.port)
            self.port = self._server.sockets[0].getsockname()[1]

        self._run(start())

    def stop(self) -> None:
        """Stop listening and drop every connection, as Asterisk stopping does."""

        async def stop() -> None:
            if self._server is not None:
                self._server.close()
                for w in list(self._writers):
                    w.close()
                await self._server.wait_closed()
                self._server = None

        self._run(stop())

    def drop_connections(self) -> None:
        """Close every client connection, keep listening."""

        async def drop() -> None:
            for w in list(self._writers):
                w.close()

        self._run(drop())

    def close(self) -> None:
        """Stop, let every connection's handler finish, and end the thread."""
        self.stop()

        async def settle() -> None:
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in others:
                t.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        self._run(settle())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def listening(self) -> bool:
        """Whether the port accepts connections now."""
        return self._server is not None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        authed = False
        try:
            writer.write(self.banner)
            await writer.drain()
            while True:
                try:
                    block = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                action = parse_action(block[:-4])
                self.received.append(action)
                name = action.get("Action", "")
                self.actions.append(name)
                aid = action.get("ActionID", "")
                if name.lower() == "login":
                    user, secret = action.get("Username"), action.get("Secret")
                    if user == self.username and secret == self.secret:
                        authed = True
                        self.logins_ok += 1
                        writer.write(response(aid, "Success", "Authentication accepted"))
                    else:
                        self.logins_failed += 1
                        await asyncio.sleep(self.auth_fail_delay)
                        writer.write(response(aid, "Error", "Authentication failed"))
                        await writer.drain()
                        return
                elif name.lower() == "logoff":
                    writer.write(response(aid, "Goodbye", "Thanks for all the fish."))
                    await writer.drain()
                    return
                elif not authed:
                    writer.write(response(aid, "Error", "Permission denied"))
                elif not await self._answer(writer, name, aid):
                    return
                await writer.drain()
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, name: str, aid: str) -> bool:
        """Write the reply to one action; False when the connection was dropped on purpose."""
        chan_sip_gone = name == "SIPshowregistry" and self.model.sip_registry is None
        if name == "Ping":
            pong = ("Ping: Pong", "Timestamp: 1764332000.000000")
            writer.write(_msg("Response: Success", *_aid(aid), *pong))
            return True
        if name not in RENDERERS or chan_sip_gone:
            writer.write(response(aid, "Error", unknown_command(name)))
            return True
        authority = AUTHORITY.get(name, frozenset({"system"}))
        if authority and not authority & self.write:
            writer.write(response(aid, "Error", "Permission denied"))
            return True
        if name in self.slow:
            await asyncio.sleep(self.slow[name])
        blocks = RENDERERS[name](self.model, aid)
        drop_after = self.drop_in_list.get(name)
        for i, block in enumerate(blocks):
            if self.interleave:
                writer.write(async_event(self.events_sent))
                self.events_sent += 1
            last = i == len(blocks) - 1
            if last and name in self.never_complete and len(blocks) > 1:
                await writer.drain()
                return True  # the closing event never comes; the connection stays up
            if drop_after is not None and i > drop_after:
                await writer.drain()
                writer.transport.abort()
                return False
            writer.write(block)
        return True


def transcript(model: PbxModel, action: str, action_id: str = "fixture-1") -> str:
    """What the server answers ``action`` with, as the text kept in tests/fixtures/ami/."""
    return b"".join(RENDERERS[action](model, action_id)).decode()


def fixture_text(name: str) -> str:
    """A transcript fixture without its comment header, lines ended by CRLF as on the wire."""
    text = (FIXTURES / name).read_text()
    body = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
    return body.lstrip("\n").replace("\n", "\r\n")


def main() -> None:
    """``python -m tests.support.ami_server [--big E,T,C]``: serve until stdin closes.

    Prints the port on the first line of stdout; benchmarks run it in a process of
    its own so that its CPU time is not counted as the client's.
    """
    import argparse
    import sys

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--big", help="endpoints,trunks,channels of PbxModel.big (else the sample)")
    p.add_argument("--secret", default="s3cret-ami-pass")
    args = p.parse_args()
    model = PbxModel.big(*map(int, args.big.split(","))) if args.big else PbxModel.sample()
    with AmiServer(model, secret=args.secret) as server:
        print(server.port, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
