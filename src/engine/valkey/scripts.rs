//! The Lua scripts, kept in `lua/*.lua` and embedded at build time. Each runs
//! with EVALSHA and is loaded again automatically after a Valkey restart
//! (NOSCRIPT).

use fred::{clients::Pool, types::Value, types::scripts::Script};

use crate::error::EngineResult;

pub struct Lua(Script);

impl Lua {
    fn new(src: &'static str) -> Self {
        Lua(Script::from_lua(src))
    }

    pub async fn run(&self, pool: &Pool, keys: Vec<String>, args: Vec<String>) -> EngineResult<Value> {
        self.0.evalsha_with_reload(pool.next(), keys, args).await.map_err(super::err)
    }
}

pub struct Scripts {
    pub append: Lua,
    pub receipt: Lua,
    pub group: Lua,
    pub presence: Lua,
    pub sweep: Lua,
}

impl Scripts {
    pub fn new() -> Self {
        Scripts {
            append: Lua::new(include_str!("lua/append.lua")),
            receipt: Lua::new(include_str!("lua/receipt.lua")),
            group: Lua::new(include_str!("lua/group.lua")),
            presence: Lua::new(include_str!("lua/presence.lua")),
            sweep: Lua::new(include_str!("lua/sweep.lua")),
        }
    }
}
