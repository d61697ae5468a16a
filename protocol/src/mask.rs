//! Personal data in logs and error texts: identity numbers and names are masked.

/// 4413**********1234: enough to tell records apart, not to identify a person.
pub fn id_no(id: &str) -> String {
    let chars: Vec<char> = id.chars().collect();
    if chars.len() <= 8 {
        return "*".repeat(chars.len());
    }
    let head: String = chars[..4].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}{}{tail}", "*".repeat(chars.len() - 8))
}

/// 张三 → 张*, 欧阳娜娜 → 欧***.
pub fn name(n: &str) -> String {
    let mut chars = n.chars();
    match chars.next() {
        Some(first) => format!("{first}{}", "*".repeat(chars.count())),
        None => String::new(),
    }
}

/// Masks every run of 15–18 characters that looks like an identity number (digits, the
/// last possibly X) inside a free text, such as a platform's error message.
pub fn scrub(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let mut j = i;
        while j < chars.len() && (chars[j].is_ascii_digit() || ((chars[j] == 'X' || chars[j] == 'x') && j > i)) {
            j += 1;
        }
        let run = j - i;
        if (15..=18).contains(&run) {
            out.push_str(&id_no(&chars[i..j].iter().collect::<String>()));
            i = j;
        } else if run > 0 {
            out.extend(&chars[i..j]);
            i = j;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(id_no("441302198003151233"), "4413**********1233");
        assert_eq!(name("张三"), "张*");
        assert_eq!(name("欧阳娜娜"), "欧***");
        assert_eq!(
            scrub("idNo 44130219800315123X mismatch; report L20261126001 v2"),
            "idNo 4413**********123X mismatch; report L20261126001 v2"
        );
        assert_eq!(scrub("code 12345 ok"), "code 12345 ok");
    }
}
