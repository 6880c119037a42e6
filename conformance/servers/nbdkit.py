"""The nbdkit profile: the memory plugin (one RAM disk shared by all connections)."""

from __future__ import annotations

from pathlib import Path

from conformance.servers.base import Deviation, Profile, ServerConfig
from conformance.servers.peers import nbdkit_argv


class Nbdkit(Profile):
    """``nbdkit -U SOCK -f --exit-with-parent [-r] [filters] memory SIZE``.

    Connection limits use the limit filter, export names the exportname
    filter (strict, so that other names are refused), descriptions the same
    filter's ``exportdesc=fixed:``.  TLS: ``--tls=require
    --tls-certificates=DIR``.
    """

    name = "nbdkit"
    sets_minimum_block_size = True
    deviations = (
        Deviation(
            "test_bad_magic_right_after_a_request_that_fails",
            "Protocol phases / Transmission / Terminating the transmission phase",
            "nbdkit 1.32 aborts (connections.c:402: raw_send_socket: Assertion 'sock >= 0' "
            "failed) when a bad request magic arrives while error replies are pending",
        ),
        Deviation(
            "test_fuzzed_requests_leave_the_server_serving_and_the_data_intact",
            "Protocol phases / Transmission / Terminating the transmission phase",
            "the same abort, reached by some fuzzed request streams (a race: not every run)",
            intermittent=True,
        ),
        Deviation(
            "test_single_connection_does_not_advertise_multi_conn",
            "Values / Handshake phase / Flag fields / Transmission flags",
            "nbdkit 1.32 with the limit filter (limit=1) still advertises "
            "NBD_FLAG_CAN_MULTI_CONN, then refuses the second connection",
        ),
        Deviation(
            "test_readonly_single_connection_does_not_advertise_multi_conn",
            "Values / Handshake phase / Flag fields / Transmission flags",
            "nbdkit 1.32 with the limit filter (limit=1) still advertises "
            "NBD_FLAG_CAN_MULTI_CONN on a read-only export, then refuses the second connection",
        ),
        Deviation(
            "test_errors_are_sent_as_structured_replies",
            "Protocol phases / Transmission / Structured reply chunk message",
            "nbdkit 1.32 answers an unknown command with a simple NBD_EINVAL reply even when "
            "structured replies were negotiated",
        ),
        Deviation(
            "test_each_information_type_is_sent_once",
            "Values / Handshake phase / Option reply types",
            "nbdkit 1.32 sends NBD_INFO_NAME and NBD_INFO_DESCRIPTION once per request: a client "
            "asking for them twice gets each twice",
        ),
        Deviation(
            "test_options_during_shutdown_get_err_shutdown",
            "Protocol phases / Handshake / Termination of the session during option haggling",
            "nbdkit 1.32 goes on answering options normally after SIGTERM while a client is "
            "connected (no NBD_REP_ERR_SHUTDOWN)",
        ),
        Deviation(
            "test_tls_before_1_2_is_refused_by_default",
            "TLS support / Security considerations / TLS versions",
            "nbdkit 1.32 with its default TLS setup (GnuTLS's default priorities on Debian 12) "
            "completes a TLS 1.1 handshake",
        ),
    )

    def prepare_command(
        self, config: ServerConfig, workdir: Path, socket_path: str, tls_dir: str | None
    ) -> list[str]:
        return nbdkit_argv(self.serve_options(config, socket_path, tls_dir, memory=config.size))
