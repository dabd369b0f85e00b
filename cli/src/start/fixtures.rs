//! What the tests of `start` share: options, a machine where everything
//! is in place, and one GPU.

use std::time::Duration;

use vramswap::ExportConfig;

use crate::config::StartOptions;
use crate::devices::fake::{gpu, FakeGpus};
use crate::system::fake::FakeSystem;

pub fn options() -> StartOptions {
    let mut export = ExportConfig::default();
    export.set("size", "8G").unwrap();
    StartOptions {
        name: "default".into(),
        export,
        priority: 50,
        nbd: None,
        connections: 4,
        threads: 16,
        plugin: Some("/usr/lib/nbdkit/plugins/nbdkit-vramswap-plugin.so".into()),
        discard: true,
        timeout: Duration::from_secs(300),
        memtest: false,
        encrypt: false,
        settings: Default::default(),
        group: None,
        elastic: None,
    }
}

/// A machine where everything is in place.
pub fn machine() -> FakeSystem {
    let mut system = FakeSystem::new();
    system.fixture("/usr/lib/nbdkit/plugins/nbdkit-vramswap-plugin.so", "");
    system.fixture("/sys/block/nbd0/size", "0\n");
    system.fixture("/sys/block/nbd0/queue/wbt_lat_usec", "2000\n");
    system.fixture("/sys/block/nbd0/queue/max_sectors_kb", "1280\n");
    system.fixture("/sys/block/nbd0/mq/0/cpu_list", "0\n");
    system.fixture("/sys/block/nbd0/mq/1/cpu_list", "1\n");
    system.fixture("/sys/block/nbd1/size", "0\n");
    system.fixture("/run/vramswap/.keep", "");
    system.answer("nbdkit --version", 0, "nbdkit 1.32.5\n", "");
    system.alive.insert(4321, true);
    system
}

/// Running nbdkit "starts" it: it writes its pidfile.
pub fn with_server(system: &mut FakeSystem) {
    system.on_run.push((
        "nbdkit --unix".into(),
        "/run/vramswap/default/nbdkit.pid".into(),
        "4321\n".into(),
    ));
}

pub fn gpus() -> FakeGpus {
    FakeGpus {
        devices: vec![gpu("NVIDIA H100 80GB HBM3", 79 << 30)],
        bad_blocks: Vec::new(),
    }
}
