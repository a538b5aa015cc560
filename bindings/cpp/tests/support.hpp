// What the test programs of beit.hpp share; standard library only. CHECK and expect_throw
// throw support::Failure, run() reports it: one line per test ("PASS name" / "FAIL name: why"),
// and summary() the counts and the exit status. A small JSON parser (enough for the
// safetensors header and the CLI's --json output) and a reader of F32 safetensors files.
#ifndef BEIT_CPP_TESTS_SUPPORT_HPP
#define BEIT_CPP_TESTS_SUPPORT_HPP

#include <beit.hpp>

#include <cctype>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace support {

inline int failures = 0;
inline int passes = 0;

struct Failure {
    std::string why;
};

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            std::ostringstream os_;                                                                \
            os_ << __FILE__ << ":" << __LINE__ << ": " << #cond;                                   \
            throw ::support::Failure{os_.str()};                                                   \
        }                                                                                          \
    } while (0)

// Runs `body`, which must throw an exception of type E with status `status` and a message
// containing `message_part`; `what` names the case in the failure.
template <class E>
void expect_throw(beit_status status, const std::function<void()>& body, const char* what,
                  const char* message_part = "") {
    try {
        body();
    } catch (const beit::Error& e) {
        const beit::Error* base = &e;
        if (dynamic_cast<const E*>(base) == nullptr) {
            throw Failure{std::string(what) + ": wrong exception class for " + e.what()};
        }
        if (e.status() != status) {
            throw Failure{std::string(what) + ": status " + beit::status_name(e.status()) +
                          ", want " + beit::status_name(status)};
        }
        if (e.message().empty() || e.message().find(message_part) == std::string::npos) {
            throw Failure{std::string(what) + ": message '" + e.message() + "' lacks '" +
                          message_part + "'"};
        }
        return;
    }
    throw Failure{std::string(what) + ": no exception"};
}

inline void run(const char* name, void (*test)()) {
    try {
        test();
        std::printf("PASS %s\n", name);
        passes++;
    } catch (const Failure& f) {
        std::printf("FAIL %s: %s\n", name, f.why.c_str());
        failures++;
    } catch (const std::exception& e) {
        std::printf("FAIL %s: unexpected exception: %s\n", name, e.what());
        failures++;
    }
    std::fflush(stdout);
}

// Prints the counts; the process's exit status.
inline int summary() {
    std::printf("%d passed, %d failed\n", passes, failures);
    return failures == 0 ? 0 : 1;
}

inline std::vector<unsigned char> read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Failure{"cannot read " + path};
    return std::vector<unsigned char>(std::istreambuf_iterator<char>(in), {});
}

// ---- JSON: objects, arrays, strings (escapes \" \\ \/ \n \t), numbers, true/false, null

struct Json {
    enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
    bool boolean = false;
    double number = 0;
    std::string text;
    std::vector<Json> items;
    std::vector<std::pair<std::string, Json>> members;

    const Json& at(const std::string& key) const {
        for (const auto& m : members) {
            if (m.first == key) return m.second;
        }
        throw Failure{"JSON: no member " + key};
    }
    const Json& at(std::size_t index) const {
        if (index >= items.size()) throw Failure{"JSON: no item " + std::to_string(index)};
        return items[index];
    }
    double num() const {
        if (kind != Number) throw Failure{"JSON: not a number"};
        return number;
    }
};

struct JsonParser {
    const std::string& s;
    std::size_t i = 0;

    char peek() {
        space();
        if (i >= s.size()) throw Failure{"JSON: unexpected end"};
        return s[i];
    }
    void space() {
        while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) i++;
    }
    void expect(char c) {
        if (peek() != c) throw Failure{std::string("JSON: expected ") + c + " at " + std::to_string(i)};
        i++;
    }
    bool word(const char* w) {
        const std::size_t n = std::strlen(w);
        if (s.compare(i, n, w) != 0) return false;
        i += n;
        return true;
    }
    std::string string() {
        expect('"');
        std::string out;
        while (i < s.size() && s[i] != '"') {
            if (s[i] == '\\' && i + 1 < s.size()) {
                i++;
                out += s[i] == 'n' ? '\n' : s[i] == 't' ? '\t' : s[i];  // \" \\ \/ stand for themselves
                i++;
            } else {
                out += s[i++];
            }
        }
        expect('"');
        return out;
    }
    Json value() {
        Json v;
        const char c = peek();
        if (c == '{') {
            v.kind = Json::Object;
            i++;
            if (peek() == '}') return i++, v;
            for (;;) {
                std::string key = string();
                expect(':');
                v.members.emplace_back(std::move(key), value());
                if (peek() == '}') return i++, v;
                expect(',');
            }
        }
        if (c == '[') {
            v.kind = Json::Array;
            i++;
            if (peek() == ']') return i++, v;
            for (;;) {
                v.items.push_back(value());
                if (peek() == ']') return i++, v;
                expect(',');
            }
        }
        if (c == '"') {
            v.kind = Json::String;
            v.text = string();
            return v;
        }
        if (word("null")) return v;
        if (word("true")) {
            v.kind = Json::Bool;
            v.boolean = true;
            return v;
        }
        if (word("false")) {
            v.kind = Json::Bool;
            return v;
        }
        std::size_t end = i;
        while (end < s.size() && (std::isdigit(static_cast<unsigned char>(s[end])) || s[end] == '-' ||
                                  s[end] == '.' || s[end] == 'e' || s[end] == 'E' || s[end] == '+')) {
            end++;
        }
        if (end == i) throw Failure{"JSON: unexpected character at " + std::to_string(i)};
        v.kind = Json::Number;
        // strtod rounds correctly, so the shortest text serde_json writes gives back its double.
        v.number = std::stod(s.substr(i, end - i));
        i = end;
        return v;
    }
};

inline Json parse_json(const std::string& text) {
    JsonParser parser{text};
    Json v = parser.value();
    parser.space();
    if (parser.i != text.size()) throw Failure{"JSON: text after the value at " + std::to_string(parser.i)};
    return v;
}

// ---- safetensors

struct StoredTensor {
    std::vector<std::size_t> shape;
    std::vector<float> values;
};

// Every F32 tensor of a .safetensors file: u64 LE header length, JSON header, data.
inline std::map<std::string, StoredTensor> read_safetensors(const std::string& path) {
    const std::vector<unsigned char> file = read_file(path);
    CHECK(file.size() >= 8);
    std::uint64_t n = 0;
    for (int k = 0; k < 8; k++) n |= std::uint64_t(file[std::size_t(k)]) << (8 * k);
    CHECK(n <= file.size() - 8);
    const Json top = parse_json(std::string(reinterpret_cast<const char*>(file.data() + 8), std::size_t(n)));
    CHECK(top.kind == Json::Object);
    const unsigned char* data = file.data() + 8 + n;
    const std::size_t data_len = file.size() - 8 - std::size_t(n);
    std::map<std::string, StoredTensor> out;
    for (const auto& m : top.members) {
        if (m.first == "__metadata__") continue;
        CHECK(m.second.at("dtype").text == "F32");
        StoredTensor t;
        for (const Json& d : m.second.at("shape").items) t.shape.push_back(std::size_t(d.number));
        const std::size_t begin = std::size_t(m.second.at("data_offsets").at(0).number);
        const std::size_t end = std::size_t(m.second.at("data_offsets").at(1).number);
        CHECK(begin <= end && end <= data_len && (end - begin) % 4 == 0);
        t.values.resize((end - begin) / 4);
        std::memcpy(t.values.data(), data + begin, end - begin);
        out[m.first] = std::move(t);
    }
    return out;
}

}  // namespace support

#endif  // BEIT_CPP_TESTS_SUPPORT_HPP
