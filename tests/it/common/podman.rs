//! podman 4 with its CNI backend, set up for a test: config and storage under a temp dir, the CNI plugin dirs
//! /usr/lib/cni plus one holding `margay` -> margay-cni (a runtime executes the file named by the plugin's
//! type), an imported busybox rootfs (no registry). Commands run in a private mount namespace (tmpfs on
//! /var/lib and /sys/fs/cgroup) and, through `nsenter --net`, in the node's network namespace, so podman's
//! cni-* netns mounts under /run/netns still propagate to the host, where the daemon plumbing them sees them
//! (`ip netns exec` would make the mounts slaves).
#![allow(dead_code)]

/// One podman configuration for a network given as a conflist.
pub struct Podman {
    dir: tempfile::TempDir,
    node: String,
}

impl Podman {
    /// Config files, a plugin dir with `margay` -> the shim, a busybox rootfs to import.
    pub fn new(node: &str, conflist: &serde_json::Value) -> Podman {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path();
        for d in [
            "plugins",
            "net.d",
            "graph",
            "run",
            "tmp",
            "rootfs/bin",
            "static",
            "volumes",
        ] {
            std::fs::create_dir_all(p.join(d)).unwrap();
        }
        // The runtime executes the file named by the plugin's type.
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_margay-cni"), p.join("plugins/margay"))
            .unwrap();
        std::fs::write(p.join("net.d/margay.conflist"), conflist.to_string()).unwrap();
        let d = p.display();
        std::fs::write(
            p.join("containers.conf"),
            format!(
                r#"[containers]
cgroups = "disabled"
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "none"
tmp_dir = "{d}/tmp"
static_dir = "{d}/static"
volume_path = "{d}/volumes"
[network]
network_backend = "cni"
cni_plugin_dirs = ["/usr/lib/cni", "{d}/plugins"]
network_config_dir = "{d}/net.d"
"#
            ),
        )
        .unwrap();
        std::fs::write(
            p.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{d}/graph\"\nrunroot = \"{d}/run\"\n"
            ),
        )
        .unwrap();
        super::sh(&format!(
            "cp /bin/busybox {d}/rootfs/bin/busybox && cd {d}/rootfs/bin && \
             for a in $(./busybox --list); do [ -e $a ] || ln -s busybox $a; done && \
             tar -C {d}/rootfs -cf {d}/rootfs.tar ."
        ));
        Podman {
            dir,
            node: node.to_string(),
        }
    }

    /// Run a podman command line in a private mount namespace (tmpfs on /var/lib) and the node's netns,
    /// after importing the image. Returns (success, output).
    pub fn run(&self, podman_args: &str) -> (bool, String) {
        let d = self.dir.path().display();
        let script = format!(
            "set -e; mount -t tmpfs tmpfs /var/lib; mount -t tmpfs tmpfs /sys/fs/cgroup; \
             export CONTAINERS_CONF={d}/containers.conf CONTAINERS_STORAGE_CONF={d}/storage.conf; \
             podman import -q --change 'CMD [\"/bin/sh\"]' {d}/rootfs.tar localhost/test-busybox >/dev/null; \
             nsenter --net=/run/netns/{node} podman {podman_args}",
            node = self.node
        );
        super::try_sh(&format!(
            "unshare -m --propagation unchanged sh -c '{}'",
            script.replace('\'', "'\\''")
        ))
    }
}
