//! The Lua scripts, kept in `lua/*.lua` and embedded at build time. Each runs
//! with EVALSHA and is loaded again automatically after a Valkey restart
//! (NOSCRIPT).

use fred::{clients::Pool, types::Value, types::scripts::Script};

use crate::error::EngineResult;

pub struct Lua {
    script: Script,
    /// The script's name in metrics.
    name: &'static str,
}

impl Lua {
    fn new(name: &'static str, src: &'static str) -> Self {
        Lua { script: Script::from_lua(src), name }
    }

    pub async fn run(&self, pool: &Pool, keys: Vec<String>, args: Vec<String>) -> EngineResult<Value> {
        let started = std::time::Instant::now();
        let r = self.script.evalsha_with_reload(pool.next(), keys, args).await;
        crate::metrics::valkey_command(self.name, started.elapsed().as_secs_f64(), r.is_ok());
        r.map_err(super::err)
    }
}

pub struct Scripts {
    pub append: Lua,
    pub receipt: Lua,
    pub group: Lua,
    pub presence: Lua,
    pub sweep: Lua,
    pub outbox: Lua,
    pub unread: Lua,
    pub erase: Lua,
    pub delete: Lua,
    pub regress: Lua,
    pub connect: Lua,
    pub update: Lua,
    pub page: Lua,
    pub retain: Lua,
}

impl Scripts {
    pub fn new() -> Self {
        Scripts {
            append: Lua::new(
                "append",
                concat!(
                    include_str!("lua/retention.lua"),
                    include_str!("lua/bucket.lua"),
                    include_str!("lua/append.lua")
                ),
            ),
            receipt: Lua::new("receipt", include_str!("lua/receipt.lua")),
            group: Lua::new("group", include_str!("lua/group.lua")),
            presence: Lua::new("presence", include_str!("lua/presence.lua")),
            sweep: Lua::new("sweep", include_str!("lua/sweep.lua")),
            outbox: Lua::new("outbox", include_str!("lua/outbox.lua")),
            unread: Lua::new("unread", include_str!("lua/unread.lua")),
            erase: Lua::new("erase", include_str!("lua/erase.lua")),
            delete: Lua::new("delete", include_str!("lua/delete.lua")),
            regress: Lua::new("regress", include_str!("lua/regress.lua")),
            connect: Lua::new("connect", concat!(include_str!("lua/bucket.lua"), include_str!("lua/connect.lua"))),
            update: Lua::new(
                "update",
                concat!(
                    include_str!("lua/retention.lua"),
                    include_str!("lua/bucket.lua"),
                    include_str!("lua/update.lua")
                ),
            ),
            page: Lua::new("page", include_str!("lua/page.lua")),
            retain: Lua::new("retain", concat!(include_str!("lua/retention.lua"), include_str!("lua/retain.lua"))),
        }
    }
}
