//! toe-iscsi's target against libiscsi (Debian `libiscsi-bin`), a real initiator: discovery
//! with `iscsi-ls` on std TCP (127.0.0.1), without authentication and with CHAP.

use std::net::TcpListener;
use std::process::Command;

use toe_iscsi::login::{Credentials, OpParams, TargetConfig};
use toemu_lab::iscsi::TcpTarget;

const IQN: &str = "iqn.2026-12.org.toemu:disk";

/// Runs a libiscsi tool; a missing one fails the test and says how to install it.
fn libiscsi(tool: &str, args: &[&str]) -> (bool, String) {
    let out = match Command::new(tool).args(args).output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "{tool} is not installed, and this test needs it: install it with `apt-get update && \
             DEBIAN_FRONTEND=noninteractive apt-get install -y libiscsi-bin` (`cargo xtask test` \
             and `cargo xtask ci` do this before the tests)"
        ),
        Err(e) => panic!("cannot run {tool}: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn target(chap: Option<Credentials>, digests: &str) -> TcpTarget {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    TcpTarget::start(
        l,
        TargetConfig {
            target_name: IQN.into(),
            alias: Some("toemu".into()),
            portal_group_tag: 1,
            chap,
            mutual: None,
            params: OpParams {
                header_digest: digests.into(),
                data_digest: digests.into(),
                ..OpParams::default()
            },
            cmd_window: 32,
        },
    )
    .unwrap()
}

#[test]
fn iscsi_ls_discovers_the_target() {
    for (digests, query) in [("None", ""), ("CRC32C,None", "?header_digest=crc32c")] {
        let t = target(None, digests);
        let url = format!("iscsi://{}/{query}", t.addr());
        let (ok, out) = libiscsi("iscsi-ls", &[&url]);
        assert!(ok, "iscsi-ls {url} failed:\n{out}");
        let want = format!("Target:{IQN} Portal:{},1", t.addr());
        assert!(
            out.contains(&want),
            "iscsi-ls {url} printed:\n{out}\nwant {want}"
        );
    }
}

#[test]
fn iscsi_ls_logs_in_with_chap_and_a_wrong_secret_is_refused() {
    let t = target(
        Some(Credentials {
            user: "alice".into(),
            secret: b"secret-of-alice".to_vec(),
        }),
        "None",
    );
    let url = format!("iscsi://alice%secret-of-alice@{}/", t.addr());
    let (ok, out) = libiscsi("iscsi-ls", &[&url]);
    assert!(ok, "iscsi-ls with CHAP failed:\n{out}");
    assert!(out.contains(&format!("Target:{IQN}")), "{out}");
    let url = format!("iscsi://alice%guess@{}/", t.addr());
    let (ok, out) = libiscsi("iscsi-ls", &[&url]);
    assert!(
        !ok && !out.contains("Target:"),
        "a wrong secret logged in:\n{out}"
    );
    let url = format!("iscsi://{}/", t.addr());
    let (ok, out) = libiscsi("iscsi-ls", &[&url]);
    assert!(!ok, "no credentials logged in:\n{out}");
}
