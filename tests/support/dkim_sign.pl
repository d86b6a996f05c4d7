#!/usr/bin/perl
# Signs the message on standard input with Perl's Mail::DKIM (Debian: libmail-dkim-perl)
# and prints it, DKIM-Signature: first, with CRLF line ends: an implementation independent
# of the dkimpy that mailsrv verifies with.  (Bookworm's Mail::DKIM 1.20230212 signs with
# rsa-sha256 and rsa-sha1 only, not Ed25519.)
#
#   dkim_sign.pl DOMAIN SELECTOR KEYFILE [HEADERS]
#
# KEYFILE is a PEM RSA private key; HEADERS the signed fields (from:to:subject:...).
use strict;
use warnings;
use Mail::DKIM::Signer;
use Mail::DKIM::TextWrap;

my ($domain, $selector, $keyfile, $headers) = @ARGV;
die "usage: $0 DOMAIN SELECTOR KEYFILE [HEADERS]\n" unless defined $keyfile;
my $signer = Mail::DKIM::Signer->new(
    Algorithm => 'rsa-sha256',
    Method    => 'relaxed/relaxed',
    Domain    => $domain,
    Selector  => $selector,
    Headers   => $headers // 'from:to:subject:date:message-id',
    KeyFile   => $keyfile,
);
binmode STDIN;
my @lines;
while (my $line = <STDIN>) {
    $line =~ s/\r?\n\z/\r\n/;
    push @lines, $line;
    $signer->PRINT($line);
}
$signer->CLOSE;
binmode STDOUT;
print $signer->signature->as_string, "\r\n";
print @lines;
