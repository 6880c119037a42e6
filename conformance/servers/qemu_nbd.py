"""The qemu-nbd profile: a raw file in a temporary directory, served by qemu-nbd."""

from __future__ import annotations

from pathlib import Path

from conformance.servers.base import Deviation, Profile, ServerConfig
from conformance.servers.peers import qemu_nbd_argv


class QemuNbd(Profile):
    """``qemu-nbd -k SOCK -f raw -t [-r] [-e N] [-x NAME] [-D DESC] FILE``.

    ``-t`` (persistent) always: without it qemu-nbd exits when its last
    client leaves, and checks connect more than once.  ``shared=None`` maps
    to ``-e 0`` (unlimited); qemu-nbd's own default is 1.  (qemu-nbd 7.2.22
    does not advertise MULTI_CONN under ``-r`` without ``-e``: the regression
    check named after that bug passes.)
    """

    name = "qemu-nbd"
    deviations = (
        Deviation(
            "test_client_vanishing_right_after_export_name",
            "Protocol phases / Handshake / Termination of the session during option haggling",
            "qemu-nbd 7.2 dies of SIGSEGV when a client closes right after NBD_OPT_EXPORT_NAME",
        ),
        Deviation(
            "test_fuzzed_option_haggling_leaves_the_server_serving_and_the_data_intact",
            "Protocol phases / Handshake / Termination of the session during option haggling",
            "the same crash, reached by some fuzzed handshakes (a race: not every run)",
            intermittent=True,
        ),
        Deviation(
            "test_write_and_trim_get_eperm",
            "Values / Transmission phase / Error values",
            "qemu-nbd 7.2 answers NBD_EINVAL, not NBD_EPERM, to writes and trims on a read-only "
            "export",
        ),
        Deviation(
            "test_write_zeroes_gets_eperm",
            "Values / Transmission phase / Request types",
            "qemu-nbd 7.2 answers NBD_EINVAL, not NBD_EPERM, to write-zeroes on a read-only export",
        ),
        Deviation(
            "test_request_beyond_the_end_gets_the_named_error[write-straddling]",
            "Values / Transmission phase / Error values",
            "qemu-nbd 7.2 answers NBD_EINVAL, not NBD_ENOSPC, to writes beyond the end",
        ),
        Deviation(
            "test_request_beyond_the_end_gets_the_named_error[write-past]",
            "Values / Transmission phase / Error values",
            "qemu-nbd 7.2 answers NBD_EINVAL, not NBD_ENOSPC, to writes beyond the end",
        ),
        Deviation(
            "test_request_beyond_the_end_gets_the_named_error[write-zeroes-straddling]",
            "Values / Transmission phase / Error values",
            "qemu-nbd 7.2 answers NBD_EINVAL, not NBD_ENOSPC, to write-zeroes beyond the end",
        ),
        Deviation(
            "test_request_beyond_the_end_gets_the_named_error[write-zeroes-past]",
            "Values / Transmission phase / Error values",
            "qemu-nbd 7.2 answers NBD_EINVAL, not NBD_ENOSPC, to write-zeroes beyond the end",
        ),
        Deviation(
            "test_disc_answers_requests_in_flight_then_closes",
            "Values / Transmission phase / Request types",
            "qemu-nbd 7.2 shuts the connection down on NBD_CMD_DISC while READ replies are "
            "still being sent: replies to requests sent before NBD_CMD_DISC are cut short or "
            "missing (a race: most runs)",
            intermittent=True,
        ),
        Deviation(
            "test_shutdown_answers_requests_in_flight",
            "Protocol phases / Transmission / Terminating the transmission phase",
            "qemu-nbd 7.2 closes the connection at SIGTERM with READ replies still being sent: "
            "replies to requests in flight are cut short (a race: most runs; on a loaded "
            "machine the replies sometimes all leave first)",
            intermittent=True,
        ),
        Deviation(
            "test_tls_before_1_2_is_refused_by_default",
            "TLS support / Security considerations / TLS versions",
            "qemu-nbd 7.2 with its default TLS setup (GnuTLS's default priorities on Debian 12) "
            "completes a TLS 1.1 handshake",
        ),
    )

    def prepare_command(
        self, config: ServerConfig, workdir: Path, socket_path: str, tls_dir: str | None
    ) -> list[str]:
        image = workdir / "disk.img"
        with open(image, "wb") as f:
            f.truncate(config.size)
        return qemu_nbd_argv(self.serve_options(config, socket_path, tls_dir, image=image))
