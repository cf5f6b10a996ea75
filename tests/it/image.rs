//! The container image of deploy/Dockerfile, built with podman without any registry, and run:
//! - the base is a Debian 12 root made here with debootstrap and `podman import`ed under the name the build
//!   argument gives; the binaries are this build's `margay` and `margay-cni` (the Dockerfile's `context`
//!   variant), so the runtime stage (its packages, paths, CMD) is the one the DaemonSet runs;
//! - inside it: `margay version`, `margay node run --help`, `margay reflector --help`, `margay-cni` answering
//!   a CNI VERSION request, `nft` present (margay runs it for outgoing NAT);
//! - the install-cni init container's command, read from deploy/daemonset.yaml, against a scratch folder;
//! - the image's `margay reflector` on the network of a lab namespace, reflecting a BIRD route to BIRD:
//!
//! ```text
//!                 netns <u>imr: podman container `margay reflector` (10.1.0.1, bridge)
//!                  ┌───────────────┴────────────────┐
//!   netns <u>imc1: BIRD 10.1.0.2             netns <u>imc2: BIRD 10.1.0.3
//!   announces 10.77.1.0/24           ->      learns 10.77.1.0/24 via 10.1.0.2 (reflected)
//! ```
//!
//! Needs root, podman, debootstrap and network access to the Debian mirror (the root's packages); without
//! them the tests SKIP (or fail under CI=true). The Debian root is kept in /var/tmp/margay-image-test so a
//! second run skips debootstrap.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use common::bgp_peers::{have_bird, wait_for, Bird};
use common::reflector::{client_v4, config_head, Star, RR_AS, RR_V4};
use common::{have, is_root, require, sh, try_sh, unique};

const IMAGE: &str = "localhost/margay:test";
const BASE: &str = "localhost/margay-base:bookworm";
const CACHE: &str = "/var/tmp/margay-image-test";

fn prereqs(test: &str) -> bool {
    require(is_root(), test, "needs root (podman storage, namespaces)")
        && require(
            have("podman"),
            test,
            "podman is not installed (scripts/install-deps.sh)",
        )
        && require(
            have("debootstrap"),
            test,
            "debootstrap is not installed (scripts/install-deps.sh)",
        )
}

/// podman with its configuration and storage in a temp dir, every command in a private mount namespace
/// (tmpfs on /var/lib and /sys/fs/cgroup), so nothing of the host's podman state is read or written.
struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    fn new() -> Podman {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().display();
        for sub in ["graph", "run", "tmp", "static", "volumes"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("podman dirs");
        }
        std::fs::write(
            dir.path().join("containers.conf"),
            format!(
                "[containers]\ncgroups = \"disabled\"\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n[engine]\ncgroup_manager = \"cgroupfs\"\n\
                 events_logger = \"none\"\ntmp_dir = \"{d}/tmp\"\nstatic_dir = \"{d}/static\"\n\
                 volume_path = \"{d}/volumes\"\n"
            ),
        )
        .expect("containers.conf");
        std::fs::write(
            dir.path().join("storage.conf"),
            format!(
                "[storage]\ndriver = \"overlay\"\ngraphroot = \"{d}/graph\"\nrunroot = \"{d}/run\"\n"
            ),
        )
        .expect("storage.conf");
        Podman { dir }
    }

    /// `podman ARGS`, returning (success, stdout+stderr).
    fn run(&self, args: &str) -> (bool, String) {
        let d = self.dir.path().display();
        let script = format!(
            "set -e; mount -t tmpfs tmpfs /var/lib; mount -t tmpfs tmpfs /sys/fs/cgroup; \
             export CONTAINERS_CONF={d}/containers.conf CONTAINERS_STORAGE_CONF={d}/storage.conf; \
             podman {args}"
        );
        try_sh(&format!(
            "unshare -m --propagation unchanged sh -c '{}' 2>&1",
            script.replace('\'', "'\\''")
        ))
    }

    fn ok(&self, args: &str) -> String {
        let (ok, out) = self.run(args);
        assert!(ok, "podman {args} failed:\n{out}");
        out
    }
}

/// The minimal Debian 12 root as a tarball (debootstrap once, cached).
fn base_tarball() -> PathBuf {
    let tar = Path::new(CACHE).join("bookworm-minbase-v2.tar");
    if tar.exists() {
        return tar;
    }
    std::fs::create_dir_all(CACHE).expect("cache dir");
    let root = Path::new(CACHE).join(format!("root.{}", std::process::id()));
    let r = root.display();
    let (ok, out) = try_sh(&format!(
        "debootstrap --variant=minbase bookworm {r} http://deb.debian.org/debian 2>&1 | tail -5"
    ));
    assert!(
        ok && root.join("usr/bin/apt-get").exists(),
        "debootstrap failed:\n{out}"
    );
    let part = tar.with_extension("tar.part");
    sh(&format!(
        "rm -rf {r}/var/cache/apt/archives/*.deb {r}/var/lib/apt/lists/* && \
         tar -C {r} -cf {} . && mv {} {} && rm -rf {r}",
        part.display(),
        part.display(),
        tar.display()
    ));
    tar
}

/// The image, built once per test process: base imported, binaries copied into a context folder, podman build.
fn image() -> &'static Podman {
    static IMG: OnceLock<Podman> = OnceLock::new();
    IMG.get_or_init(|| {
        let p = Podman::new();
        p.ok(&format!(
            "import -q --change 'CMD [\"/bin/bash\"]' {} {BASE}",
            base_tarball().display()
        ));
        let ctx = p.dir.path().join("context");
        std::fs::create_dir_all(ctx.join("out")).expect("context dir");
        for bin in [
            env!("CARGO_BIN_EXE_margay"),
            env!("CARGO_BIN_EXE_margay-cni"),
        ] {
            let name = Path::new(bin).file_name().expect("binary name");
            let dst = ctx.join("out").join(name);
            std::fs::copy(bin, &dst).expect("copy binary");
            // Debug binaries carry hundreds of MB of debug info the image does not need.
            sh(&format!("strip {}", dst.display()));
        }
        let dockerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/Dockerfile");
        // --network host: the RUN steps reach the Debian mirror without podman making a bridge anywhere.
        p.ok(&format!(
            "build -q --network host --isolation chroot -f {} --build-arg BINARIES=context \
             --build-arg BASE={BASE} -t {IMAGE} {}",
            dockerfile.display(),
            ctx.display()
        ));
        let size = p.ok(&format!("image inspect --format '{{{{.Size}}}}' {IMAGE}"));
        eprintln!("image {IMAGE}: {} bytes", size.trim());
        p
    })
}

#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn image_runs_margay_and_the_cni_shim() {
    let t = "image_runs_margay_and_the_cni_shim";
    if !prereqs(t) {
        return;
    }
    let p = image();
    let run = |cmd: &str| p.ok(&format!("run --rm --network none {IMAGE} {cmd}"));
    let v = run("margay version");
    assert!(v.contains(env!("CARGO_PKG_VERSION")), "margay version: {v}");
    let h = run("margay node run --help");
    assert!(h.contains("--etcd-endpoints"), "node run --help: {h}");
    let h = run("margay reflector --help");
    assert!(h.contains("--cluster-id"), "reflector --help: {h}");
    // margay shells out to nft for outgoing NAT; the image must have it.
    let n = run("nft --version");
    assert!(n.contains("nftables"), "nft --version: {n}");
    // The CNI VERSION command, as a runtime sends it (env + stdin).
    let out = p.ok(&format!(
        "run --rm -i --network none -e CNI_COMMAND=VERSION {IMAGE} sh -c \
         'echo {{\\\"cniVersion\\\":\\\"1.0.0\\\"}} | margay-cni'"
    ));
    let v: serde_json::Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("margay-cni VERSION: {e}: {out}"));
    let supported = v["supportedVersions"]
        .as_array()
        .expect("supportedVersions");
    assert!(
        supported.iter().any(|s| s == "1.0.0"),
        "margay-cni VERSION: {v}"
    );
    // The default command is the node daemon, as the DaemonSet runs it.
    let cmd = p.ok(&format!(
        "image inspect --format '{{{{.Config.Cmd}}}}' {IMAGE}"
    ));
    assert!(cmd.contains("margay node run"), "CMD: {cmd}");
}

/// The install-cni init container of deploy/daemonset.yaml: its command, env and mounts as the manifest
/// gives them, run in the image.
#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn image_install_cni_writes_plugin_and_conflist() {
    let t = "image_install_cni_writes_plugin_and_conflist";
    if !prereqs(t) {
        return;
    }
    let manifest = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/daemonset.yaml"),
    )
    .expect("read daemonset.yaml");
    let docs: Vec<serde_json::Value> = manifest
        .split("\n---")
        .filter_map(|d| serde_yaml_ng::from_str(d).ok())
        .collect();
    let config = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "margay-config")
        .expect("margay-config ConfigMap");
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("DaemonSet");
    let init = ds["spec"]["template"]["spec"]["initContainers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "install-cni"))
        .expect("install-cni init container");
    let command: Vec<String> = init["command"]
        .as_array()
        .expect("command")
        .iter()
        .map(|s| s.as_str().expect("string").to_string())
        .collect();
    assert_eq!(command[..2], ["/bin/sh", "-c"], "install-cni command");

    let p = image();
    let scratch = tempfile::tempdir().expect("tempdir");
    let bin_dir = scratch.path().join("opt/cni/bin");
    let net_dir = scratch.path().join("etc/cni/net.d");
    std::fs::create_dir_all(&bin_dir).expect("bin dir");
    std::fs::create_dir_all(&net_dir).expect("net dir");
    // Env as the manifest maps it from the ConfigMap; a numeric MTU, as an operator sets veth_mtu.
    let mut env = String::new();
    let mut env_files = Vec::new();
    for e in init["env"].as_array().expect("env") {
        let name = e["name"].as_str().expect("env name");
        let key = e["valueFrom"]["configMapKeyRef"]["key"]
            .as_str()
            .expect("configMapKeyRef");
        let value = if key == "veth_mtu" {
            "1440".to_string()
        } else {
            config["data"][key]
                .as_str()
                .expect("ConfigMap key")
                .to_string()
        };
        let f = scratch.path().join(format!("env.{name}"));
        std::fs::write(&f, &value).expect("env file");
        env_files.push((name.to_string(), f));
    }
    // Multi-line values travel as files read by a wrapper, so no shell quoting can change them.
    let mut exports = String::new();
    for (name, f) in &env_files {
        env.push_str(&format!(" -v {}:/env/{name}:ro", f.display()));
        exports.push_str(&format!("export {name}=\"$(cat /env/{name})\"; "));
    }
    let mut mounts = String::new();
    let host_paths = [("cni-bin-dir", &bin_dir), ("cni-net-dir", &net_dir)];
    for m in init["volumeMounts"].as_array().expect("volumeMounts") {
        let name = m["name"].as_str().expect("mount name");
        let path = m["mountPath"].as_str().expect("mountPath");
        let host = host_paths
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("unexpected volume {name}"))
            .1;
        mounts.push_str(&format!(" -v {}:{path}", host.display()));
    }
    let script_file = scratch.path().join("install.sh");
    std::fs::write(&script_file, format!("{exports}\n{}", command[2])).expect("script");
    let out = p.ok(&format!(
        "run --rm --network none{env}{mounts} -v {}:/install.sh:ro {IMAGE} {} {} /install.sh",
        script_file.display(),
        command[0],
        "-eu"
    ));
    assert!(out.contains("installed"), "install-cni: {out}");

    // The kubelet looks for the plugin named by "type" in /opt/cni/bin and for *.conflist in /etc/cni/net.d.
    let plugin = bin_dir.join("margay");
    let installed = std::fs::read(&plugin).expect("/opt/cni/bin/margay");
    let (_, inside) = p.run(&format!(
        "run --rm --network none {IMAGE} sha256sum /usr/local/bin/margay-cni"
    ));
    let want = inside
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    let got = sh(&format!("sha256sum {}", plugin.display()));
    assert!(
        !installed.is_empty() && got.starts_with(&want),
        "the installed plugin is not the image's margay-cni ({got} vs {inside})"
    );
    let mode = std::fs::metadata(&plugin).expect("plugin").permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o755
    );
    let leftovers: Vec<_> = std::fs::read_dir(&net_dir)
        .expect("net.d")
        .chain(std::fs::read_dir(&bin_dir).expect("bin"))
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    let conflist = std::fs::read_to_string(net_dir.join("10-margay.conflist")).expect("conflist");
    let c: serde_json::Value =
        serde_json::from_str(&conflist).unwrap_or_else(|e| panic!("conflist: {e}\n{conflist}"));
    assert_eq!(c["plugins"][0]["type"], "margay", "{c:#}");
    assert_eq!(c["plugins"][0]["mtu"], 1440, "{c:#}");
    assert!(c["cniVersion"].is_string(), "{c:#}");
}

/// A container started from the image and removed (with `podman rm -f`) when the guard drops.
struct Container<'a> {
    podman: &'a Podman,
    name: String,
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = self.podman.run(&format!("rm -f -t 0 {}", self.name));
    }
}

fn bird_conf(i: usize, statics: &[&str]) -> String {
    let rid = client_v4(i);
    let routes: String = statics
        .iter()
        .map(|p| format!(" route {p} blackhole;"))
        .collect();
    format!(
        "router id {rid};\nlog stderr all;\nprotocol device {{ }}\nprotocol direct {{ ipv4; }}\n\
         protocol static s4 {{ ipv4;{routes} }}\n\
         protocol bgp to_rr {{ local {rid} as {RR_AS}; neighbor {RR_V4} as {RR_AS}; hold time 6;\n\
         connect delay time 1; connect retry time 1; error wait time 1, 2;\n\
         ipv4 {{ import all; export where source = RTS_STATIC; }}; }}\n"
    )
}

#[test]
#[ignore = "needs bird2: scripts/test.sh runs it (--include-ignored)"]
fn image_reflector_reflects_bird_route() {
    let t = "image_reflector_reflects_bird_route";
    if !prereqs(t)
        || !require(
            have_bird(),
            t,
            "bird2 is not installed (scripts/install-deps.sh)",
        )
    {
        return;
    }
    let p = image();
    let star = Star::new("im", 2);
    let mut config = config_head();
    for i in 1..=2 {
        config.push_str(&common::reflector::bgp_peer(
            &format!("c{i}"),
            &client_v4(i),
            RR_AS,
            "",
        ));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("rr.yaml"), &config).expect("rr.yaml");
    let name = unique("imrr");
    let _rr = Container {
        podman: p,
        name: name.clone(),
    };
    // The reflector in the hub's network namespace, as a route-reflector pod on the host network.
    p.ok(&format!(
        "run -d --name {name} --network ns:/run/netns/{hub} -v {}:/etc/margay:ro {IMAGE} \
         margay reflector --config /etc/margay/rr.yaml --node-name rr --cluster-id 1.1.1.1 \
         --listen {RR_V4} --state-dir /tmp",
        dir.path().display(),
        hub = star.hub
    ));
    let b1 = Bird::start(star.ns(1), &bird_conf(1, &["10.77.1.0/24"]));
    let b2 = Bird::start(star.ns(2), &bird_conf(2, &[]));
    let logs = || p.run(&format!("logs {name}")).1;
    wait_for(
        "BIRD 2 to learn 10.77.1.0/24 reflected by the containerised margay",
        Duration::from_secs(60),
        || {
            let out = b2.birdc("show route 10.77.1.0/24 all");
            if out.contains("10.77.1.0/24") && out.contains(&format!("via {}", client_v4(1))) {
                Ok(())
            } else {
                Err(format!(
                    "{out}\nBIRD 1: {}\nreflector log:\n{}",
                    b1.birdc("show protocols"),
                    logs()
                ))
            }
        },
    );
    // RFC 4456: the reflected path carries the originator and the reflector's cluster id.
    let out = b2.birdc("show route 10.77.1.0/24 all");
    assert!(
        out.contains("originator_id") && out.contains("1.1.1.1"),
        "reflected route lacks ORIGINATOR_ID / CLUSTER_LIST:\n{out}"
    );
    let (_, ps) = try_sh(&format!("ip netns pids {}", star.hub));
    assert!(!ps.trim().is_empty(), "no process in the hub namespace");
}
