//! Plain text tables as calicoctl prints them: upper-case headers, columns separated by " | ", a rule under
//! the header. The one table renderer: `margay status`'s peer table and the CLI's `get` and `ipam` tables.

/// A table being built.
pub struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(head: &[&str]) -> Table {
        Table {
            head: head.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, r: Vec<String>) {
        self.rows.push(r);
    }

    pub fn render(&self) -> String {
        let n = self.head.len();
        let mut w: Vec<usize> = self.head.iter().map(|h| h.len()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(n) {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let parts: Vec<String> = (0..n)
                .map(|i| {
                    format!(
                        "{:<width$}",
                        cells.get(i).map(String::as_str).unwrap_or(""),
                        width = w[i]
                    )
                })
                .collect();
            format!("| {} |\n", parts.join(" | "))
        };
        let rule = format!(
            "+{}+\n",
            w.iter()
                .map(|x| "-".repeat(x + 2))
                .collect::<Vec<_>>()
                .join("+")
        );
        let mut out = rule.clone();
        out.push_str(&line(&self.head));
        out.push_str(&rule);
        for r in &self.rows {
            out.push_str(&line(r));
        }
        out.push_str(&rule);
        out
    }
}
