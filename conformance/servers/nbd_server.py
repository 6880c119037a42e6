"""The nbd-server profile: a generated config file and a raw file in a temporary directory.

nbd-server has no foreground mode that serves more than one client (``-d``
serves a single connection and exits), so it is started as the daemon it
wants to be: the launcher process exits at once, and the daemon is
followed, and stopped, through the PID file it writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conformance.servers.base import (
    Deviation,
    LocalServer,
    Profile,
    ProfileCannotDo,
    ServerConfig,
)

#: nbd-server names exports after config sections; the default export needs a name.
DEFAULT_EXPORT = "conformance"


class NbdServer(Profile):
    """nbd-server 3.24 from a config file: ``nbd-server -C CONF -p PIDFILE``."""

    name = "nbd-server"
    # A per-export ``force_tls`` (nbd-server(5)) beside a plain export: SELECTIVETLS.
    serves_tls_only_exports = True
    deviations = (
        Deviation(
            "test_single_connection_does_not_advertise_multi_conn",
            "Values / Handshake phase / Flag fields / Transmission flags",
            "nbd-server 3.24 advertises NBD_FLAG_CAN_MULTI_CONN whatever maxconnections says; "
            "with maxconnections = 1 the second client is refused (NBD_REP_ERR_POLICY on GO)",
        ),
        Deviation(
            "test_readonly_single_connection_does_not_advertise_multi_conn",
            "Values / Handshake phase / Flag fields / Transmission flags",
            "nbd-server 3.24 advertises NBD_FLAG_CAN_MULTI_CONN whatever maxconnections says; "
            "with maxconnections = 1 the second client is refused (NBD_REP_ERR_POLICY on GO)",
        ),
        Deviation(
            "test_flag_not_documented_for_the_command_gets_einval[read+NO_HOLE]",
            "Values / Transmission phase / Error values",
            "nbd-server 3.24 ignores NBD_CMD_FLAG_NO_HOLE on NBD_CMD_READ instead of answering "
            "NBD_EINVAL",
        ),
        Deviation(
            "test_flag_not_documented_for_the_command_gets_einval[write+NO_HOLE]",
            "Values / Transmission phase / Error values",
            "nbd-server 3.24 ignores NBD_CMD_FLAG_NO_HOLE on NBD_CMD_WRITE instead of answering "
            "NBD_EINVAL",
        ),
        # Found by the raw-wire checks (test_handshake.py, test_options.py).
        Deviation(
            "test_unknown_client_flag_drops_connection",
            "Values / Handshake phase / Flag fields / Client flags",
            "nbd-server 3.24 carries on with unknown client flags set and answers options",
        ),
        Deviation(
            "test_abort_gets_ack",
            "Values / Handshake phase / Option types",
            "nbd-server 3.24 closes the connection on NBD_OPT_ABORT without NBD_REP_ACK",
        ),
        Deviation(
            "test_go_repeats_what_info_said",
            "Values / Handshake phase / Option types",
            "nbd-server 3.24 reports export size 0 to NBD_OPT_INFO (it opens the file only on "
            "NBD_OPT_GO), then the real size to NBD_OPT_GO",
        ),
        *(
            Deviation(
                f"test_malformed_info_request_is_rejected[{case}-{option}]",
                "Values / Handshake phase / Option types",
                "nbd-server 3.24 does not reject an NBD_OPT_INFO/GO whose information-request "
                "count contradicts the option length: it waits for bytes that never come",
            )
            for case in ("info-count-past-end", "shorter-than-6")
            for option in ("INFO", "GO")
        ),
        Deviation(
            "test_each_information_type_is_sent_once",
            "Values / Handshake phase / Option reply types",
            "nbd-server 3.24 sends NBD_INFO_EXPORT once per request: a client asking for it "
            "twice (as well as implicitly) gets it twice",
        ),
        Deviation(
            "test_shutdown_answers_requests_in_flight",
            "Protocol phases / Transmission / Terminating the transmission phase",
            "nbd-server 3.24 closes the connection at SIGTERM without answering the READs it "
            "has received",
        ),
        Deviation(
            "test_tls_before_1_2_is_refused_by_default",
            "TLS support / Security considerations / TLS versions",
            "nbd-server 3.24 with its default TLS setup (GnuTLS's default priorities on Debian 12) "
            "completes a TLS 1.1 handshake",
        ),
        Deviation(
            "test_client_without_fixed_newstyle_never_gets_tls_reqd",
            "TLS support / Server-side requirements",
            "nbd-server 3.24 with force_tls answers NBD_REP_ERR_TLS_REQD to a client that did "
            "not reply NBD_FLAG_C_FIXED_NEWSTYLE, which it MUST serve in NOTLS mode",
        ),
        Deviation(
            "test_starttls_with_data_gets_ack_then_tls_or_a_permitted_error",
            "Values / Handshake phase / Option types",
            "nbd-server 3.24 sends no reply at all to an NBD_OPT_STARTTLS that carries data",
        ),
    )

    def check_config(self, config: ServerConfig) -> None:
        if config.description is not None:
            raise ProfileCannotDo("nbd-server has no export descriptions")

    def export_name(self, config: ServerConfig) -> str:
        return config.export_name or DEFAULT_EXPORT

    def config_text(
        self, config: ServerConfig, workdir: Path, socket_path: str, tls_dir: str | None
    ) -> str:
        generic = [f"unixsock = {socket_path}", "allowlist = true"]
        if config.uses_tls_credentials:
            assert tls_dir is not None
            generic += [
                f"certfile = {tls_dir}/server-cert.pem",
                f"keyfile = {tls_dir}/server-key.pem",
                f"cacertfile = {tls_dir}/ca-cert.pem",
            ]
        if config.tls:
            generic.append("force_tls = true")  # FORCEDTLS
        sections = {self.export_name(config): self._export(config, workdir / "disk.img")}
        if config.tls_only_export is not None:
            # SELECTIVETLS: this export alone has force_tls.
            tls_only = self._export(config, workdir / "tls-only.img")
            sections[config.tls_only_export] = [*tls_only, "force_tls = true"]
        return (
            "[generic]\n"
            + "".join(f"\t{line}\n" for line in generic)
            + "".join(
                f"[{name}]\n" + "".join(f"\t{line}\n" for line in lines)
                for name, lines in sections.items()
            )
        )

    @staticmethod
    def _export(config: ServerConfig, image: Path) -> list[str]:
        """The lines of one export's section, served from IMAGE (made here, sparse)."""
        with open(image, "wb") as f:
            f.truncate(config.size)
        export = [
            f"exportname = {image}",
            f"filesize = {config.size}",
            "trim = true",
            "flush = true",
            "fua = true",
            f"readonly = {str(config.read_only).lower()}",
        ]
        if config.shared:
            export.append(f"maxconnections = {config.shared}")
        return export

    def prepare_command(
        self, config: ServerConfig, workdir: Path, socket_path: str, tls_dir: str | None
    ) -> list[str]:
        conf = workdir / "nbd-server.conf"
        conf.write_text(self.config_text(config, workdir, socket_path, tls_dir))
        return ["nbd-server", "-C", str(conf), "-p", str(workdir / "nbd-server.pid")]

    def launch(self, argv: list[str], **kwargs: Any) -> LocalServer:
        # nbd-server forks away: follow it through its PID file.
        return LocalServer(argv, pid_file=kwargs["workdir"] / "nbd-server.pid", **kwargs)
