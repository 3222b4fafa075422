package zimage

// Reading the service's answers: the kinds of failure by status and shape,
// the out-of-points words, and that a prompt echoed in an error is no
// evidence about the account.

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
)

// The one guess at the service's words for an account out of
// points, case-insensitive, whole words for the English ones.
func TestUnitIsNoPoints(t *testing.T) {
	for msg, want := range map[string]bool{
		"积分不足":                           true,
		"您的积分已用完，请充值":                    true,
		"账户余额不足":                         true,
		"Insufficient points":            true,
		"INSUFFICIENT_POINTS":            true,
		"insufficient_quota":             true,
		"not enough points (0 left)":     true,
		"Points: 0":                      true,
		"balance too low":                true,
		"Your balance is 0.":             true,
		"error=insufficient":             true,
		"":                               false,
		"nsfw content detected":          false,
		"upstream endpoints are busy":    false,
		"load balancer timeout":          false,
		"rebalanced the queue":           false,
		"checkpoints are loading":        false,
		"pointsless":                     false,
		"model not found":                false,
		"Internal Server Error":          false,
		"rate limit exceeded, slow down": false,
	} {
		if got := isNoPoints(msg); got != want {
			t.Errorf("isNoPoints(%q) = %v, want %v", msg, got, want)
		}
	}
}

// Text the client wrote is never evidence about an account: the words of
// the out-of-points rule that the request's own texts carry are not read
// in a failure, however the service echoed them (whole, cut, in another
// case, with its spaces changed), while the words the service added are.
func TestUnitIsNoPointsEchoedPrompt(t *testing.T) {
	const long = "forbidden points and balance in a long prompt that the service cuts"
	for _, tc := range []struct {
		name, msg string
		sent      []string
		want      bool
	}{
		{"the prompt echoed whole", "prompt contains forbidden word: forbidden points no-enhance", []string{"forbidden points no-enhance"}, false},
		{"the echo without the prompt to compare", "prompt contains forbidden word: forbidden points no-enhance", nil, true},
		{"cut short", "prompt contains forbidden word: " + long[:25] + "…", []string{long}, false},
		{"cut at both ends", "forbidden word in '…points and bal…'", []string{long}, false},
		{"only the forbidden word", "forbidden word: points", []string{long}, false},
		{"in capitals", "PROMPT CONTAINS: FORBIDDEN POINTS", []string{"forbidden points"}, false},
		{"another case in the prompt", "prompt contains: balance", []string{"BALANCE of light"}, false},
		{"spaces collapsed", "forbidden: points balance", []string{"points\n\n   balance"}, false},
		{"spaces removed", "forbidden: points", []string{"p o i n t s"}, false},
		{"an invisible character removed", "forbidden: points", []string{"poi\u200bnts"}, false},
		{"full-width letters folded", "forbidden: points", []string{"ｐｏｉｎｔｓ"}, false},
		{"积分 echoed", "违禁词：积分商城", []string{"积分商城的海报"}, false},
		{"余额 with spaces in the prompt", "违禁词：余额", []string{"余 额"}, false},
		{"a word of the service's beside the echo", "Insufficient points (prompt: 'sharp points')", []string{"sharp points"}, true},
		{"the service's own words, another prompt", "积分不足，请充值", []string{"a red fox"}, true},
		{"the prompt in the source URL", "cannot download https://img.example/points.png", []string{"edit it", "https://img.example/points.png"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := isNoPoints(tc.msg, tc.sent...); got != tc.want {
				t.Errorf("isNoPoints(%q, %q) = %v, want %v", tc.msg, tc.sent, got, tc.want)
			}
		})
	}
}

// The answers of a service that echoes the prompt: read with the texts
// the request sent, an echo is neither out of points nor a challenge
// page; an HTTP 402 stays out of points whatever its text.
func TestUnitParseAnswerEcho(t *testing.T) {
	const prompt = "forbidden points <html> no-enhance"
	for _, tc := range []struct {
		name          string
		status        int
		ctype, body   string
		echo, without string // the kind with the prompt sent, and without
	}{
		{"400 echo", 400, "application/json", `{"success":false,"message":"prompt contains forbidden word: ` + prompt + `"}`, kindBadResponse, kindNoPoints},
		{"200 success false echo", 200, "application/json", `{"success":false,"error":{"message":"bad prompt: FORBIDDEN POINTS"}}`, kindBadResponse, kindNoPoints},
		{"403 plain text starting with the echo", 403, "text/plain", "<html> no-enhance is forbidden", kindBadResponse, kindBlocked},
		{"403 HTML page", 403, "text/html", "<html>forbidden</html>", kindBlocked, kindBlocked},
		{"402 echo", 402, "application/json", `{"success":false,"message":"` + prompt + `"}`, kindNoPoints, kindNoPoints},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp := &http.Response{StatusCode: tc.status, Status: http.StatusText(tc.status), Header: http.Header{"Content-Type": {tc.ctype}}}
			for sent, want := range map[string]string{prompt: tc.echo, "": tc.without} {
				_, ue := parseAnswer(resp, []byte(tc.body), sent)
				if ue == nil || ue.kind != want {
					t.Errorf("sent %q: failure %+v, want kind %s", sent, ue, want)
				}
			}
		})
	}
}

// The service's answer, read: points as numbers or
// numeric strings (absent is fine, odd types never break a success),
// image_id and model_name, and challenge pages told from JSON errors.
func TestUnitParseAnswer(t *testing.T) {
	type want struct {
		kind               string // "" for success
		used, remaining    string // "-" for absent
		imageID, modelName string
	}
	pts := func(has bool, f float64) string {
		if !has {
			return "-"
		}
		return fmt.Sprint(f)
	}
	ok := func(data string) string {
		return `{"success":true,"data":{"image_url":"https://img.example.com/a.png"` + data + `}}`
	}
	for _, tc := range []struct {
		name   string
		status int
		ctype  string
		body   string
		want   want
	}{
		{"numbers", 200, "application/json", ok(`,"points_used":5,"remaining_points":1234.5,"image_id":987,"model_name":"Z-Image Turbo"`), want{"", "5", "1234.5", "987", "Z-Image Turbo"}},
		{"numeric strings", 200, "application/json", ok(`,"points_used":" 5 ","remaining_points":"-3","image_id":"img-9"`), want{"", "5", "-3", "img-9", ""}},
		{"absent", 200, "application/json", ok(``), want{"", "-", "-", "", ""}},
		{"nulls", 200, "application/json", ok(`,"points_used":null,"remaining_points":null,"image_id":null,"model_name":null`), want{"", "-", "-", "", ""}},
		{"odd types", 200, "application/json", ok(`,"points_used":{"n":1},"remaining_points":[1],"image_id":true,"model_name":{"x":1}`), want{"", "-", "-", "", ""}},
		{"not numbers", 200, "application/json", ok(`,"points_used":"five","remaining_points":"NaN","model_name":"a\u0007b"`), want{"", "-", "-", "", "ab"}},
		{"infinite", 200, "application/json", ok(`,"points_used":"Inf","remaining_points":"1e999"`), want{"", "-", "-", "", ""}},
		{"long image_id", 200, "application/json", ok(`,"image_id":"` + strings.Repeat("x", 300) + `"`), want{"", "-", "-", truncate(strings.Repeat("x", 300), maxInfoRunes), ""}},

		{"403 HTML challenge", 403, "text/html; charset=UTF-8", `<!DOCTYPE html><html><head><title>Just a moment...</title>`, want{kind: kindBlocked}},
		{"503 HTML without a type", 503, "", "\n  <html><body>Checking your browser</body></html>", want{kind: kindBlocked}},
		{"403 cf-mitigated", 403, "application/octet-stream", `x`, want{kind: kindBlocked}},
		{"403 JSON error", 403, "application/json", `{"success":false,"error":"account suspended"}`, want{kind: kindBadResponse}},
		{"402", 402, "application/json", `{"success":false,"error":"payment required"}`, want{kind: kindNoPoints}},
		{"402 without a body", 402, "", ``, want{kind: kindNoPoints}},
		{"403 insufficient points", 403, "application/json", `{"success":false,"error":"insufficient points"}`, want{kind: kindNoPoints}},
		{"200 success false 积分不足", 200, "application/json", `{"success":false,"message":"积分不足，请充值"}`, want{kind: kindNoPoints}},
		{"400 error object about balance", 400, "application/json", `{"error":{"message":"Balance exhausted"}}`, want{kind: kindNoPoints}},
		{"429 insufficient_quota", 429, "application/json", `{"error":"insufficient_quota"}`, want{kind: kindNoPoints}},
		{"500 余额", 500, "application/json", `{"error":"余额不足"}`, want{kind: kindNoPoints}},
		{"502 load balancer", 502, "application/json", `{"error":"load balancer error"}`, want{kind: kind5xx}},
		{"403 HTML challenge about points", 403, "text/html", `<html>points balance</html>`, want{kind: kindBlocked}},
		{"200 not JSON", 200, "text/plain", `insufficient points`, want{kind: kindBadResponse}},
		{"503 JSON error", 503, "application/json", `{"error":"maintenance"}`, want{kind: kind5xx}},
		{"500 HTML", 500, "text/html", `<html>oops</html>`, want{kind: kind5xx}},
		{"200 HTML", 200, "text/html", `<html>hi</html>`, want{kind: kindBadResponse}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp := &http.Response{StatusCode: tc.status, Status: http.StatusText(tc.status), Header: http.Header{}}
			if tc.ctype != "" {
				resp.Header.Set("Content-Type", tc.ctype)
			}
			if tc.name == "403 cf-mitigated" {
				resp.Header.Set("Cf-Mitigated", "challenge")
			}
			res, ue := parseAnswer(resp, []byte(tc.body))
			if tc.want.kind != "" {
				if ue == nil || ue.kind != tc.want.kind {
					t.Fatalf("failure %+v, want kind %s", ue, tc.want.kind)
				}
				if strings.Contains(ue.message+ue.detail, "<") {
					t.Errorf("the page reached the error: %+v", ue)
				}
				return
			}
			if ue != nil {
				t.Fatalf("failure %+v, want success", ue)
			}
			i := res.info
			got := want{"", pts(i.hasPointsUsed, i.pointsUsed), pts(i.hasRemainingPoints, i.remainingPoints), i.imageID, i.modelName}
			if got != tc.want {
				t.Errorf("info %+v, want %+v", got, tc.want)
			}
		})
	}
}
