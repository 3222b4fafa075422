package zimage

// Reading the image service's answers (docs/design.md#the-service-behind-it):
// the kinds of failure and the client's answer for each, the answer's
// JSON, and the rules that take a failure for an account out of points or
// for a Cloudflare challenge. This is the one place where the gateway
// reads the service's words, so that a wrong guess about them is
// corrected here once.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"
	"unicode"
)

// Kinds of upstream failure, as counted in caddy_zimage_upstream_errors_total.
const (
	kindTimeout     = "timeout"
	kindRefused     = "refused"
	kind5xx         = "status_5xx"
	kind429         = "status_429"
	kindBadResponse = "bad_response"
	kindBlocked     = "blocked"   // a Cloudflare challenge page instead of an answer (docs/design.md#failover-and-rests)
	kindNoPoints    = "no_points" // the account is out of points (docs/design.md#failover-and-rests, isNoPoints)
	kindProxy       = "proxy"     // the forward proxy failed, no account's fault (imageClient.proxyFailure)
	kindCanceled    = "canceled"  // the client left; not counted as an upstream error
)

// upstreamError is a failed generation, classified for the status it maps
// to (429, 504, 502) and for metrics.
type upstreamError struct {
	kind       string
	message    string // for the client, scrubbed and shortened by apiError
	detail     string // for the log only: the Go error chain, with addresses
	retryAfter string
	retryable  bool
	// allOut is set by the account pool on a no_points failure when every
	// account of the pool is out of points (docs/design.md#failover-and-rests)
	allOut bool
}

func (e *upstreamError) Error() string { return "upstream " + e.kind + ": " + e.message }

// apiError maps the failure to the client's answer.
func (e *upstreamError) apiError(scrub *scrubber) *apiError {
	// scrub first, then shorten: a key that straddles the cut must not
	// leave its first half behind
	msg := truncate(scrub.Replace(e.message), maxMessageRunes)
	switch e.kind {
	case kind429:
		// the client is told what the gateway itself does: the account
		// rests this long, the service's Retry-After capped, never the service's header as it came
		ra := retryAfterSeconds(restFor(e, 0, time.Now()))
		return &apiError{status: http.StatusTooManyRequests, typ: "rate_limit_error", code: "rate_limit_exceeded", retryAfter: ra,
			message: "The image service is rate limiting requests: " + msg}
	case kindNoPoints:
		if e.allOut {
			// no Retry-After: while every account rests the gateway still
			// asks them (a top-up works at once), so there is no time to name
			return &apiError{status: http.StatusBadGateway, typ: "upstream_error", code: "no_points",
				message: "The image service accounts have no points left (add points to an account, or add an account): " + msg}
		}
	case kindTimeout:
		return &apiError{status: http.StatusGatewayTimeout, typ: "upstream_error", code: "upstream_timeout",
			message: "The image service did not answer in time: " + msg}
	case kindCanceled:
		return &apiError{status: 499, typ: "invalid_request_error", code: "client_closed_request", message: "The client closed the request"}
	case kindProxy:
		return &apiError{status: http.StatusBadGateway, typ: "upstream_error", code: "upstream_proxy",
			message: "The image service was not reached: " + msg}
	case kindBlocked:
		// the message is ours alone: the challenge page is never passed on
		return &apiError{status: http.StatusBadGateway, typ: "upstream_error", code: "upstream_blocked",
			message: "The image service's Cloudflare protection refused the request (it answered a challenge page instead of an image); retry later"}
	}
	return &apiError{status: http.StatusBadGateway, typ: "upstream_error", code: "upstream_error",
		message: "The image service failed: " + msg}
}

// errGenerationTimeout is the cause of the context of a generation that
// ran out of its timeout, which tells it from a client that left.
var errGenerationTimeout = errors.New("generation timeout")

// ctxFailure classifies a call cut short by its context: the generation's
// timeout, or the client that went away.
func ctxFailure(ctx context.Context, timeout time.Duration) *upstreamError {
	if errors.Is(context.Cause(ctx), errGenerationTimeout) || errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return &upstreamError{kind: kindTimeout, message: "no answer within " + timeout.String()}
	}
	return &upstreamError{kind: kindCanceled, message: "client went away"}
}

// upstreamAnswer is the service's reply; error texts come in several shapes.
// The optional parts of data read what they can and never fail, so that a
// type the gateway did not expect there never turns a success into a
// failure.
type upstreamAnswer struct {
	Success *bool `json:"success"`
	Data    struct {
		ImageURL        string       `json:"image_url"`
		PointsUsed      answerPoints `json:"points_used"`
		RemainingPoints answerPoints `json:"remaining_points"`
		ImageID         answerText   `json:"image_id"`
		ModelName       answerText   `json:"model_name"`
	} `json:"data"`
	Error   answerError `json:"error"`
	Message string      `json:"message"`
}

// answerPoints is a number of points: a JSON number or a numeric string
// (the service has sent both); anything else, or nothing, is absent.
type answerPoints struct {
	n  float64
	ok bool
}

func (p *answerPoints) UnmarshalJSON(b []byte) error {
	p.n, p.ok = parsePoints(b)
	return nil
}

// answerText is image_id or model_name, for the log (rawText).
type answerText string

func (t *answerText) UnmarshalJSON(b []byte) error {
	*t = answerText(rawText(b))
	return nil
}

// answerError is the text of the answer's error: the string itself, or
// the message of an object; "" for anything else.
type answerError string

func (e *answerError) UnmarshalJSON(b []byte) error {
	var s string
	var obj struct {
		Message string `json:"message"`
	}
	switch {
	case json.Unmarshal(b, &s) == nil && s != "":
		*e = answerError(s)
	case json.Unmarshal(b, &obj) == nil:
		*e = answerError(obj.Message)
	default:
		*e = ""
	}
	return nil
}

// parseAnswer reads the service's answer: an image, or a classified
// failure. A failure that says the account is out of points is kind
// no_points whatever its status (docs/design.md#failover-and-rests): an HTTP 402, or one whose own
// text isNoPoints. sent are the texts the request carried (its prompt
// as sent, the source image's URL), which the service may echo in its
// errors: they are no evidence about the account (isNoPoints,
// isChallenge).
func parseAnswer(resp *http.Response, raw []byte, sent ...string) (upstreamResult, *upstreamError) {
	if isChallenge(resp, raw, sent...) {
		// Cloudflare's "Just a moment…" page: nothing of it goes anywhere,
		// the log's detail names the status alone (docs/design.md#failover-and-rests)
		return upstreamResult{}, &upstreamError{kind: kindBlocked, message: "Cloudflare challenge page",
			detail: "HTTP " + strconv.Itoa(resp.StatusCode) + " with an HTML body"}
	}
	// decoded once, for the classification and the no_points check alike;
	// an HTML page only costs the decoder its first byte
	var ans upstreamAnswer
	jsonErr := json.Unmarshal(raw, &ans)
	res, ue := classifyAnswer(resp, raw, ans, jsonErr)
	if ue == nil {
		return res, ue
	}
	if resp.StatusCode == http.StatusPaymentRequired || isNoPoints(upstreamMessage(ans, ""), sent...) {
		return upstreamResult{}, &upstreamError{kind: kindNoPoints, message: upstreamMessage(ans, resp.Status)}
	}
	return res, ue
}

// The words the gateway takes for the service saying that an account has
// no points left: 积分 (points) and 余额 (balance) anywhere, the English
// ones as whole words. This and isChallenge are the one place where the
// gateway reads the service's words for a kind of failure; see
// isNoPoints.
var (
	noPointsHan     = [...]string{"积分", "余额"}
	noPointsEnglish = [...]string{"points", "balance", "insufficient"}
)

// isNoPoints reports whether a failure's own text (the service's error or
// message) says that the account has no points left (docs/design.md#failover-and-rests). No
// public client shows the service's words for it, so this is a guess, and
// one that fails safe: a failure it wrongly takes for no_points only moves
// the request to another account at once and rests this one (a resting
// account still serves when every account rests; a request rests at most
// one account so: accountPool.run), and one it misses is handled as its
// status says. It matches, case-insensitively, 积分 or 余额 anywhere, and
// the words "points", "balance" and "insufficient" when not part of a
// longer word ("insufficient_points" and "Points:" match, "endpoints" and
// "load balancer" do not). The README says the same.
//
// A word that one of sent (the texts the request carried: its prompt as
// sent to the service) contains is not read: the service may echo the
// prompt in its errors ("prompt contains a forbidden word: …"), whole,
// cut at any length, in another case or with its spaces changed, and a
// word the client wrote says nothing about the account. So the echo of
// "forbidden points" is no evidence, and neither is a real "insufficient
// points" for a prompt that says "insufficient points": that request gets
// the service's failure, and the next one that reaches the account rests
// it.
func isNoPoints(msg string, sent ...string) bool {
	return noPointsWords(msg, false)&^carriedWords(sent) != 0
}

// noPointsWords is the set of the words of the rule that s says (bit i:
// noPointsHan then noPointsEnglish), whole English words only, or any
// occurrence when anywhere is set.
func noPointsWords(s string, anywhere bool) (said uint) {
	for i, w := range noPointsHan {
		if strings.Contains(s, w) {
			said |= 1 << i
		}
	}
	word := func(run string) {
		for i, w := range noPointsEnglish {
			if strings.EqualFold(run, w) || anywhere && strings.Contains(run, w) {
				said |= 1 << (len(noPointsHan) + i)
			}
		}
	}
	if anywhere {
		word(s)
		return said
	}
	start := -1
	for i, r := range s {
		switch letter := unicode.IsLetter(r); {
		case letter && start < 0:
			start = i
		case !letter && start >= 0:
			word(s[start:i])
			start = -1
		}
	}
	if start >= 0 {
		word(s[start:])
	}
	return said
}

// carriedWords is the set of the rule's words that any of sent contains
// anywhere, read the way an echo may have changed it: in lower case, with
// full-width letters as ASCII and without spaces, control or invisible
// formatting characters (so "POI NTS" and "ｐｏｉｎｔｓ" carry "points").
func carriedWords(sent []string) (carried uint) {
	for _, s := range sent {
		if s == "" {
			continue
		}
		carried |= noPointsWords(foldEcho(s), true)
	}
	return carried
}

// foldEcho is s lower-cased, full-width ASCII folded to ASCII, and
// without spaces, control and format characters: what an echo of s could
// have become.
func foldEcho(s string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case unicode.IsSpace(r) || unicode.IsControl(r) || unicode.Is(unicode.Cf, r):
			return -1
		case r >= '！' && r <= '～':
			r -= '！' - '!'
		}
		return unicode.ToLower(r)
	}, s)
}

// classifyAnswer is parseAnswer by status and shape alone; ans is raw
// decoded, jsonErr what decoding it gave.
func classifyAnswer(resp *http.Response, raw []byte, ans upstreamAnswer, jsonErr error) (upstreamResult, *upstreamError) {
	switch {
	case resp.StatusCode == http.StatusTooManyRequests:
		return upstreamResult{}, &upstreamError{kind: kind429, message: upstreamMessage(ans, resp.Status),
			retryAfter: cleanRetryAfter(resp.Header.Get("Retry-After"))}
	case resp.StatusCode >= 500:
		switch resp.StatusCode {
		case http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
			return upstreamResult{}, &upstreamError{kind: kind5xx, message: upstreamMessage(ans, resp.Status), retryable: true}
		}
		return upstreamResult{}, &upstreamError{kind: kind5xx, message: upstreamMessage(ans, resp.Status)}
	case resp.StatusCode >= 300 && resp.StatusCode <= 399:
		// the key goes only to the configured URL (imageClient)
		return upstreamResult{}, &upstreamError{kind: kindBadResponse,
			message: "it answered " + resp.Status + ", a redirect, which the gateway does not follow: set the upstream URL to where it leads"}
	case resp.StatusCode < 200 || resp.StatusCode > 299:
		return upstreamResult{}, &upstreamError{kind: kindBadResponse, message: upstreamMessage(ans, resp.Status)}
	case jsonErr != nil:
		return upstreamResult{}, &upstreamError{kind: kindBadResponse, message: "answer is not valid JSON"}
	case ans.Success == nil || !*ans.Success:
		return upstreamResult{}, &upstreamError{kind: kindBadResponse, message: upstreamMessage(ans, "generation was not successful")}
	case strings.TrimSpace(ans.Data.ImageURL) == "":
		return upstreamResult{}, &upstreamError{kind: kindBadResponse, message: "answer has no image_url"}
	}
	imageURL := strings.TrimSpace(ans.Data.ImageURL)
	// the URL goes into markdown and may be downloaded: only http(s) links
	// (never javascript: or data:) are passed on
	if checkHTTPURL(imageURL) != nil {
		return upstreamResult{}, &upstreamError{kind: kindBadResponse, message: "answer has an image_url that is not an http(s) URL"}
	}
	res := upstreamResult{imageURL: imageURL}
	res.info.pointsUsed, res.info.hasPointsUsed = ans.Data.PointsUsed.n, ans.Data.PointsUsed.ok
	res.info.remainingPoints, res.info.hasRemainingPoints = ans.Data.RemainingPoints.n, ans.Data.RemainingPoints.ok
	res.info.imageID = string(ans.Data.ImageID)
	res.info.modelName = string(ans.Data.ModelName)
	return res, nil
}

// isChallenge tells a Cloudflare challenge (or any HTML error page) on a
// 403 or 503 from the service's own answers, which are JSON: Cloudflare
// marks its challenges with cf-mitigated, and its pages are HTML. A 403
// with a JSON body is the service's own refusal, a normal error. A body
// sniffed as HTML whose mark one of sent carries (a prompt that begins
// "<html" echoed at the start of a plain-text error) is not.
func isChallenge(resp *http.Response, raw []byte, sent ...string) bool {
	if resp.StatusCode != http.StatusForbidden && resp.StatusCode != http.StatusServiceUnavailable {
		return false
	}
	if strings.EqualFold(resp.Header.Get("Cf-Mitigated"), "challenge") {
		return true
	}
	if ct := strings.ToLower(resp.Header.Get("Content-Type")); strings.HasPrefix(ct, "text/html") || strings.HasPrefix(ct, "application/xhtml") {
		return true
	}
	head := bytes.TrimLeft(bytes.TrimPrefix(raw, []byte("\xef\xbb\xbf")), " \t\r\n")
	head = head[:min(len(head), 16)]
	for _, p := range []string{"<!doctype html", "<html", "<head", "<!--"} {
		if len(head) >= len(p) && strings.EqualFold(string(head[:len(p)]), p) {
			return !carriedMark(sent, p)
		}
	}
	return false
}

// carriedMark reports whether any of sent carries mark, read as
// carriedWords reads them.
func carriedMark(sent []string, mark string) bool {
	for _, s := range sent {
		if strings.Contains(foldEcho(s), strings.ReplaceAll(mark, " ", "")) {
			return true
		}
	}
	return false
}

// parsePoints reads a number of points (answerPoints).
func parsePoints(raw []byte) (float64, bool) {
	s := strings.TrimSpace(string(raw))
	if u, err := strconv.Unquote(s); err == nil && strings.HasPrefix(s, `"`) {
		s = strings.TrimSpace(u)
	}
	if s == "" || s == "null" {
		return 0, false
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || math.IsNaN(f) || math.IsInf(f, 0) {
		return 0, false
	}
	return f, true
}

// maxInfoRunes bounds the image_id and model_name the log carries.
const maxInfoRunes = 128

// rawText is a JSON string or number as text (image_id and model_name),
// shortened and without control characters; anything else is "".
func rawText(raw []byte) string {
	var s string
	if json.Unmarshal(raw, &s) != nil {
		var n json.Number
		if json.Unmarshal(raw, &n) != nil {
			return ""
		}
		s = n.String()
	}
	return truncate(stripControl(strings.TrimSpace(s)), maxInfoRunes)
}

// upstreamMessage picks the service's own error text (error, error.message
// or message); fallback when it gave none. It is shortened only after
// scrubbing, in apiError.
func upstreamMessage(ans upstreamAnswer, fallback string) string {
	msg := ans.Message
	if ans.Error != "" {
		msg = string(ans.Error)
	}
	msg = strings.TrimSpace(msg)
	if msg == "" {
		return fallback
	}
	return msg
}

// cleanRetryAfter passes on a Retry-After in seconds or HTTP-date form, and
// drops anything else rather than echo arbitrary upstream bytes.
func cleanRetryAfter(v string) string {
	v = strings.TrimSpace(v)
	if n, err := strconv.Atoi(v); err == nil && n >= 0 {
		return strconv.Itoa(n)
	}
	if _, err := http.ParseTime(v); err == nil {
		return v
	}
	return ""
}

// maxMessageRunes is how much of a party's own error text reaches a client.
const maxMessageRunes = 300
